"""The web dashboard: one static page (HTML, JS, CSS; no build step) served at ``/``.

The page carries no data of its own. It reads everything from the REST API and ``GET /events``
with the same bearer token as any other client, so it adds no way to see or change a job that the
API does not already guard. The routes sit behind :class:`~conveyor.service.security.
SecurityMiddleware` like every route but ``/health``. The response headers forbid inline script,
framing and foreign origins, a second line of defence behind the page's rule of putting job text
into the DOM only as text.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

_TYPES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Read once at import: three small files, and no file I/O on the event loop per request.
_FILES: Final = {name: resources.files(__name__).joinpath(name).read_bytes() for name in _TYPES}
_HEADERS: Final = {
    # Only this origin's script and style files may run: an injected <script> or onerror=
    # attribute would be inert even if job text ever reached the DOM as markup.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidate: a new release's app.js must not meet an old page
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> Response:
    return Response(_FILES[name], media_type=_TYPES[name], headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    """The dashboard page."""
    return _file("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The page's script and style sheet (a fixed list: no path from the request is opened)."""
    if name == "index.html" or name not in _FILES:
        raise HTTPException(404, "no such dashboard file; the page is at /")
    return _file(name)
