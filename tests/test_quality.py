"""The quality gates as tests: lint, format, types, generated code up to date, no torch on the
serving path. They run in the suite so that the one test command checks everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the quality gates (ruff, mypy, generated code)

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_lint() -> None:
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_on_service_and_training() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_on_service() -> None:
    result = run(sys.executable, "-m", "mypy", "--strict", "service")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_client_imports_neither_onnxruntime_nor_the_engine() -> None:
    probe = (
        "import sys\n"
        "from service.client import Client\n"
        "print(sorted(m for m in ('onnxruntime', 'service.engine', 'service.batcher') "
        "if m in sys.modules))\n"
    )
    result = run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_generated_protobuf_code_is_up_to_date() -> None:
    result = run(sys.executable, "scripts/generate_protos.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_path_never_imports_torch() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "service").rglob("*.py")
        if "_proto" not in p.parts
    )
    probe = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "print(len([m for m in sys.modules if m.startswith('service')]))\n"
    )
    result = run(sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= len(modules)
