"""Azure ML's answers as Microsoft recorded them: azure-ai-ml's live-test sessions, published in
Azure/azure-sdk-assets (tests/data/azureml/recordings/, each file names its source).

`answer()` hands one recorded response to `AzureMLTransport` (status, body, the headers that steer
the SDK: Location, Azure-AsyncOperation, ...). A test may rename what the recorded session called
its resources (an endpoint "online-ept-6696557f8dec409" becomes the run's endpoint) and set the few
fields that carry the state a test drives (provisioningState, a job's status, tags); every other
key, casing and null stays as Microsoft recorded it.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

RECORDINGS = Path(__file__).parent / "data" / "azureml" / "recordings"
#: The workspace of the recorded sessions, as Microsoft's sanitiser left it.
RECORDED_WSID = ("/subscriptions/00000000-0000-0000-0000-000000000/resourceGroups/00000/providers/"
                 "Microsoft.MachineLearningServices/workspaces/00000")
#: Response headers the SDK acts on; the rest (request ids, dates) carry nothing for the client.
STEERING_HEADERS = ("location", "azure-asyncoperation", "retry-after", "x-ms-async-operation-timeout")


@lru_cache(maxsize=None)
def recording(name: str) -> dict:
    return json.loads((RECORDINGS / f"{name}.json").read_text())


def entry(name: str, method: str, status: int | None = None, path: str = "") -> dict:
    """The first recorded exchange of ``name`` with this method, status and a URL matching ``path``."""
    for exchange in recording(name)["entries"]:
        if exchange["RequestMethod"] == method and (status is None or exchange["StatusCode"] == status) \
                and re.search(path, exchange["RequestUri"].split("?")[0]):
            return exchange
    raise LookupError(f"no {method} {status} {path!r} in recording {name}")


def answer(name: str, method: str, status: int | None = None, path: str = "", rename: dict[str, str] | None = None,
           edit=None) -> tuple[int, object, dict]:
    """(status, body, headers) of one recorded exchange, with names replaced and ``edit(body)`` applied."""
    exchange = entry(name, method, status, path)
    text = json.dumps(exchange["ResponseBody"])
    for old, new in (rename or {}).items():
        text = text.replace(old, new)
    body = json.loads(text)
    if edit is not None:
        body = copy.deepcopy(body)
        edit(body)
    headers = {k: v for k, v in (exchange.get("ResponseHeaders") or {}).items() if k.lower() in STEERING_HEADERS}
    for old, new in (rename or {}).items():
        headers = {k: v.replace(old, new) for k, v in headers.items()}
    return exchange["StatusCode"], body, headers


def body(name: str, method: str, status: int | None = None, path: str = "", **kwargs):
    return answer(name, method, status, path, **kwargs)[1]
