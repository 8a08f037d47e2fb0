"""The app's functions by name, as the Functions host indexes them from `function_app.app`."""

from functools import lru_cache

import function_app


@lru_cache(maxsize=1)
def _index() -> dict:
    # The app validates name uniqueness on every get_functions() call, so index it once.
    return {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}


def handler(name: str):
    return _index()[name]
