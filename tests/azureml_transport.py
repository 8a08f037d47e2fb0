"""An azure.core transport answering Azure ML's REST calls by method + URL pattern, with responses
Microsoft recorded (tests/azureml_recordings.py).

The SDK (azure-ai-ml) runs for real above it: entity building, validation, serialisation, error mapping.
Every request is kept (method, URL, JSON body) so tests assert what would have gone to Azure. A request
no route answers gets Azure ML's recorded 404 (a missing model container), as the service would.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse
from azure.core.pipeline.transport._requests_basic import _is_rest
from azure.core.rest._requests_basic import RestRequestsTransportResponse

from tests.azureml_recordings import answer as recorded_answer

#: The azureml registry's chat_completion_pipeline component version. No recording holds it: the REST
#: envelope of a recorded registry component with this component's inputs (tests/data/azureml/recordings/README.md).
PIPELINE_COMPONENT = json.loads((Path(__file__).parent / "data" / "azureml" / "chat_completion_pipeline.json").read_text())


def _jwt(scope: str = "https://management.azure.com/.default") -> str:
    """An unsigned JWT shaped like an Entra ID access token (the SDK reads its claims, never checks it)."""
    import base64

    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"aud": scope.removesuffix("/.default"), "iss": "https://sts.windows.net/tenant/", "oid": "object-id",
              "tid": "tenant-id", "upn": "tester@example.com", "exp": int(time.time()) + 3600}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class StaticCredential:
    """A token credential that never calls Entra ID."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken(_jwt(*scopes[:1]), int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None):
        return AccessTokenInfo(_jwt(*scopes[:1]), int(time.time()) + 3600)


def error(status: int, code: str, message: str = "") -> tuple[int, dict, dict]:
    return status, {"error": {"code": code, "message": message or code}}, {}


class AzureMLTransport(RequestsTransport):
    def __init__(self):
        super().__init__()
        self.routes: list[tuple[str, re.Pattern, object]] = []
        self.requests: list[tuple[str, str, object]] = []

    def on(self, method: str, pattern: str, answer) -> None:
        """Answer ``method`` requests whose URL matches ``pattern``; the latest route wins."""
        self.routes.insert(0, (method, re.compile(pattern), answer))

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, object]]:
        return [c for c in self.requests if c[0] == method and re.search(pattern, c[1])]

    def open(self):
        pass

    def close(self):
        pass

    def __exit__(self, *args):
        pass

    def send(self, request, **kwargs):
        raw = request.content if _is_rest(request) else request.data
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode()
        try:
            body = json.loads(raw) if isinstance(raw, str) and raw else raw
        except ValueError:
            body = raw
        self.requests.append((request.method, request.url, body))
        status, payload, headers = recorded_answer("model_version", "GET", 404)
        for method, pattern, answer in self.routes:
            if method == request.method and pattern.search(request.url):
                result = answer(request, body) if callable(answer) else answer
                status, payload, headers = result if isinstance(result, tuple) else (200, result, {})
                break
        response = requests.Response()
        response.status_code = status
        response._content = b"" if payload is None else json.dumps(payload).encode()
        response.raw = io.BytesIO(response._content)
        response._content_consumed = True
        response.headers.update({"content-type": "application/json", "x-ms-request-id": "test", **headers})
        response.url = request.url
        response.reason = "OK" if status < 400 else "Error"
        if _is_rest(request):
            return RestRequestsTransportResponse(request=request, internal_response=response, block_size=4096)
        return RequestsTransportResponse(request, response, 4096)
