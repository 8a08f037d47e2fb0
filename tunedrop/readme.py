"""Keep the README's generated blocks (settings, training parameters) in step with the code.

`python -m tunedrop.readme` rewrites them; the tests fail when they drift.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from click.testing import CliRunner

README = Path(__file__).resolve().parent.parent / "README.md"


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
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> int:
    text = README.read_text()
    updated = render(text, blocks())
    if updated != text:
        README.write_text(updated)
        print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
