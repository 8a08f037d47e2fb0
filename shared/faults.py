"""Fault injection for the reliability tests: die at a named point, as a crashed worker would.

`TUNEDROP_FAULTS=after_submit,after_register` makes the process exit at once (no clean-up, no
exception handlers) when it reaches those points, right after an external call and before the
run record says so. Unset in production: `point()` is then a dictionary lookup.
"""

import os

EXIT_CODE = 86
POINTS = ("after_submit", "after_register", "after_begin_deploy", "after_delete")


def point(name: str) -> None:
    if name in os.environ.get("TUNEDROP_FAULTS", "").split(","):
        os._exit(EXIT_CODE)
