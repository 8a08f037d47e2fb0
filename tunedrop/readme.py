"""Keep the README's generated blocks (settings, training parameters) in step with the code.

`python -m tunedrop.readme` rewrites them; the tests fail when they drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"
FAULTS = README.parent / "docs" / "dataset-faults.md"


def faults_markdown() -> str:
    """docs/dataset-faults.md: every validation code, from shared.validation's catalogue."""
    from shared.validation import ERROR_CODES, FORMATS, WARNING_CODES

    out = [
        "# Dataset faults",
        "",
        "<!-- generated from shared/validation.py by `python -m tunedrop.readme`; do not edit -->",
        "",
        "Every problem `tunedrop validate` and the `ingest` function report carries one of these stable",
        "`code`s, the 1-based `line` (the row, for Parquet; none for file-level faults), a `field` path such",
        "as `messages[2].role`, and a message that says what to do. Any error rejects the dataset (it is",
        "moved to the quarantine container with its report); warnings do not.",
        "",
        f"Formats: {', '.join(f'`{f}`' for f in FORMATS)} (chosen by the file name: `*.parquet`, `*.gz`, else JSONL).",
        "",
        "## Errors",
        "",
        "| Code | Meaning |",
        "|---|---|",
    ]
    out += [f"| `{code}` | {text} |" for code, text in ERROR_CODES.items()]
    out += ["", "## Warnings", "", "| Code | Meaning |", "|---|---|"]
    out += [f"| `{code}` | {text} |" for code, text in WARNING_CODES.items()]
    return "\n".join(out) + "\n"


def blocks() -> dict[str, str]:
    from tunedrop.cli import cli

    runner = CliRunner()
    return {
        "settings": runner.invoke(cli, ["settings", "--markdown"]).output.strip(),
        "training": runner.invoke(cli, ["settings", "--training", "--markdown"]).output.strip(),
    }


def render(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> int:
    text = README.read_text()
    updated = render(text, blocks())
    if updated != text:
        README.write_text(updated)
        print("README.md updated")
    faults = faults_markdown()
    if not FAULTS.is_file() or FAULTS.read_text() != faults:
        FAULTS.parent.mkdir(exist_ok=True)
        FAULTS.write_text(faults)
        print(f"{FAULTS.relative_to(README.parent)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
