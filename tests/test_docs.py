"""The docs stay true to the code: every setting and every exported metric is documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import SecretStr

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
API_DOC = (ROOT / "docs" / "API.md").read_text()


def test_every_setting_is_documented_with_flag_and_env() -> None:
    for name, field in Settings.model_fields.items():
        if field.annotation is not SecretStr:  # secrets: environment only, never a flag
            assert f"`--{name.replace('_', '-')}`" in API_DOC, name
        assert f"`RNNSERVE_{name.upper()}`" in API_DOC, name


def test_every_metric_is_documented() -> None:
    names = {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for n in Metrics().series_names()
    }
    for name in names:
        assert f"`{name}`" in API_DOC, name


def test_settings_table_is_generated_from_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/settings_table.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_every_catalogued_error_case_is_documented() -> None:
    from tests.test_error_catalogue import CASES, CONTROL_CASES

    errors_doc = (ROOT / "docs" / "ERRORS.md").read_text()
    for case in [*CASES, *CONTROL_CASES]:
        assert f"`{case.name}`" in errors_doc, case.name


def test_ci_runs_the_readme_test_command() -> None:
    """A newcomer needs the Quick start's two commands, one serving and one testing, and CI runs
    that test command itself."""
    readme = (ROOT / "README.md").read_text()
    serve, test = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quick start")[1], re.S)[:2]
    assert "rnnserve serve" in serve
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
