"""The admin and demo pages: static HTML, CSS and small hand-written scripts in this package,
served as they are (no build step). The pages fetch their data from JSON routes
(/admin/api/summary, /demo/api/…) and write it with textContent only, so nothing a database
row or a visitor holds is ever parsed as HTML; the Content-Security-Policy allows this origin's
own files and nothing else (no inline script, no third-party host).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi.responses import Response

# Every file that may be served, with its type: a name not listed here is a 404.
ASSETS: dict[str, str] = {
    "admin.html": "text/html; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "demo.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "web.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@lru_cache(maxsize=len(ASSETS))
def _read(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def asset(name: str) -> Response | None:
    """The file as a response, or None when `name` is not one of ASSETS."""
    media_type = ASSETS.get(name)
    if media_type is None:
        return None
    # Pages change with a release: revalidate rather than serve a stale script to a new page.
    headers = {**SECURITY_HEADERS, "cache-control": "no-cache"}
    return Response(_read(name), media_type=media_type, headers=headers)
