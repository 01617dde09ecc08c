"""The Demo UI and the docs page: static files shipped in the package (no build step, no CDN).

`/` serves the dashboard, `/ui/*` its assets, `/api/v1/docs` the API docs page (a small
renderer of `/api/v1/openapi.json` written for this project, in `static/docs.js`). All are open:
the pages ask for an API key and keep it in the browser's localStorage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

STATIC_DIR: Final = Path(__file__).parent / "static"
UI_PREFIX: Final = "/ui"
SECURITY_HEADERS: Final = {
    # Everything is same-origin; no inline scripts or styles, no third parties.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page(name: str) -> web.Response:
    body = (STATIC_DIR / name).read_bytes()
    return web.Response(
        body=body, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS
    )


async def index(_: web.Request) -> web.Response:
    return _page("index.html")


async def docs(_: web.Request) -> web.Response:
    return _page("docs.html")


ASSETS: Final = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}
"""The files `/ui/{name}` serves, listed once: no path from a request reaches the filesystem."""


async def asset(request: web.Request) -> web.FileResponse:
    """A static asset; an unknown name is the gateway's JSON 404 (aiohttp's static route
    answers a miss with an empty `application/octet-stream` body)."""
    path = ASSETS.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def add_ui_routes(app: web.Application) -> None:
    """`/` and the static assets; these routes are not part of the API document."""
    app.router.add_get("/", index, allow_head=False)
    app.router.add_get(UI_PREFIX + "/{name}", asset)


async def add_asset_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: security headers on the static assets too."""
    if request.path.startswith(UI_PREFIX + "/"):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
