"""HTTP: the status page (``GET /api/status``), one self-contained HTML file (functions/status_page.html) with
its script and styles inline: no build step, no CDN, works offline.

The page itself is anonymous and holds no data; its script reads everything from the app's JSON routes
with the function key, which it takes from the URL fragment (``/api/status#key=<function key>``: a
fragment never reaches a server, a log or a Referer) or from a form, and keeps in the tab only. A strict
Content-Security-Policy lets only that script (by its hash) run and talk to this origin.
"""

import base64
import functools
import hashlib
import re
from pathlib import Path

import azure.functions as func

from functions.web import Request, Response, answers_json

bp = func.Blueprint()
PAGE = Path(__file__).with_name("status_page.html")


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, str]:
    """The page and its Content-Security-Policy (the inline script allowed by its SHA-256)."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), policy


@bp.route(route="status", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@answers_json
async def status_page(req: Request) -> Response:
    body, policy = page()
    return Response(body, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": policy, "Cache-Control": "no-store",
                             "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})
