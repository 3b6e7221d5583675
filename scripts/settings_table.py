"""Rewrite the settings table of docs/API.md from service.settings.Settings (one command):

python scripts/settings_table.py          # rewrite
python scripts/settings_table.py --check  # exit 1 if the table is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import SecretStr

from service.settings import BUNDLED_MODELS, DEFAULT_STATE_DIR, Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "API.md"
HEADER = "| setting (flag) | environment variable | default | meaning |\n|---|---|---|---|\n"


def table() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, SecretStr):
            default = "(empty)" if not default.get_secret_value() else "(set)"
        elif default is None:
            default = "—"
        elif default == BUNDLED_MODELS:
            default = "the bundled models (`models/`, installed as `service/bundled_models`)"
        elif default == DEFAULT_STATE_DIR:  # machine-dependent: the rule, not this machine's path
            default = "`$XDG_STATE_HOME/rnnserve`, else `~/.local/state/rnnserve`"
        flag = (
            "(environment only)"
            if field.annotation is SecretStr
            else f"`--{name.replace('_', '-')}`"
        )
        rows.append(f"| {flag} | `RNNSERVE_{name.upper()}` | {default} | {field.description} |")
    return HEADER + "\n".join(rows) + "\n"


def rewrite(text: str) -> str:
    start = text.index(HEADER)
    end = text.index("\n\n", start)
    return text[:start] + table() + text[end + 1 :]


def main() -> int:
    text = DOC.read_text()
    new = rewrite(text)
    if "--check" in sys.argv:
        if new != text:
            print("docs/API.md settings table is out of date: python scripts/settings_table.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
