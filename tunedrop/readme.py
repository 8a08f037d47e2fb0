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
FAILURES_DOC = README.parent / "docs" / "run-failures.md"


def code_page(title: str, source: str, intro: list[str], sections: dict[str, dict[str, str]]) -> str:
    """A generated page of codes: a title, where it comes from, an introduction, a table a section."""
    out = [f"# {title}", "", f"<!-- generated from {source} by `python -m tunedrop.readme`; do not edit -->", "",
           *intro]
    for heading, codes in sections.items():
        out += ["", f"## {heading}", "", "| Code | Meaning |", "|---|---|"]
        out += [f"| `{code}` | {text} |" for code, text in codes.items()]
    return "\n".join(out) + "\n"


def faults_markdown() -> str:
    """docs/dataset-faults.md: every dataset fault code, from shared/datasets/codes.py."""
    from shared.datasets import ERROR_CODES, FORMATS, WARNING_CODES

    return code_page("Dataset faults", "shared/datasets/codes.py", [
        "Every problem `tunedrop validate` and the `ingest` function report carries one of these stable",
        "`code`s, the 1-based `line` (the row, for Parquet; none for file-level faults), a `field` path such",
        "as `messages[2].role`, and a message that says what to do. Any error rejects the dataset (it is",
        "moved to the quarantine container with its report); warnings do not.",
        "",
        f"Formats: {', '.join(f'`{f}`' for f in FORMATS)} (chosen by the file name: `*.parquet`, `*.gz`, else JSONL).",
    ], {"Errors": ERROR_CODES, "Warnings": WARNING_CODES})


def failures_markdown() -> str:
    """docs/run-failures.md: every code a run can be refused or fail with, from shared.failures."""
    from shared.failures import API_ANSWERS, FAILURES, REJECTIONS, SERVER_ANSWERS

    return code_page("Run failures", "shared/failures.py", [
        "A failed run's `error_code` (and its `run.failed` webhook's `code`) is one of these; a dataset is",
        "refused with a fault code of [dataset-faults.md](dataset-faults.md) or a rejection code below. Two",
        "families pass Azure's own words through: Azure ML's deployment error codes (`OutOfQuota`,",
        "`OutOfCapacity`, `ResourceNotReady`, `BadArgument`, ..., each known one with its fix in the run's",
        "error) and `http_<status>` for an Azure answer without a code. Most failures can be retried",
        "(`tunedrop retry RUN_ID`) once their cause is mended.",
    ], {"Rejections": REJECTIONS, "Failures": FAILURES, "Scoring answers of a local model server": SERVER_ANSWERS,
        "Answers of the OpenAI-compatible API (`code` in OpenAI's error shape)": API_ANSWERS})


def limits_markdown() -> str:
    """The README's Limits table: every setting declared with ``_limit`` in shared/settings.py."""
    from shared.settings import limits

    rows = ["| Limit | Default | Past it |", "|---|---|---|"]
    rows += [f"| `{env}`: {help} | `{default}` | {exceeded} |" for env, default, help, exceeded in limits()]
    return "\n".join(rows)


def blocks() -> dict[str, str]:
    from tunedrop.cli import cli

    runner = CliRunner()
    return {
        "settings": runner.invoke(cli, ["settings", "--markdown"]).output.strip(),
        "training": runner.invoke(cli, ["settings", "--training", "--markdown"]).output.strip(),
        "limits": limits_markdown(),
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
    for path, content in ((FAULTS, faults_markdown()), (FAILURES_DOC, failures_markdown())):
        if not path.is_file() or path.read_text() != content:
            path.parent.mkdir(exist_ok=True)
            path.write_text(content)
            print(f"{path.relative_to(README.parent)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
