"""The search page (`GET /`) and the media it shows (`GET /v1/media/{content_hash}`).

The page is one static HTML file (serving/static/search.html) that calls /v1/search and
shows hits as thumbnails. Media bytes are streamed from the media store by content hash,
with HTTP range requests (a video opens at a moment without downloading all of it), and
only to a tenant that owns them: the hash must be one of the tenant's ok sources, or a
frame sampled from one of its videos; anything else is a 404, as if it did not exist.
"""

from __future__ import annotations

import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from mm_pipelines.serving import app as core

HASH = re.compile(r"^[0-9a-f]{64}$")
PAGE = "search.html"


def page_html() -> str:
    return (resources.files("mm_pipelines.serving") / "static" / PAGE).read_text("utf-8")


def routes(api: core.Api) -> list[Route]:
    async def page(request: Request) -> HTMLResponse:
        """The search page: a query box (text, or an image/audio file), results as
        thumbnails, video moments, spoken passages, filters by modality and batch."""
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})

    async def media(request: Request) -> Response:
        """The bytes of one stored object (range requests supported), for its tenant only."""
        from mm_pipelines.storage import catalog

        content_hash = request.path_params["content_hash"]
        tenant = core.request_tenant(request, request.query_params.get("tenant"))
        if not HASH.match(content_hash):
            raise core.ApiError(400, "bad_hash", "a content hash is 64 lowercase hex digits")
        if api.media is None:
            raise core.ApiError(503, "no_media_store", "this server has no media store configured")
        mime = await api.db(lambda conn: catalog.visible_to(conn, content_hash, tenant))
        if mime is None or not api.media.exists(content_hash):
            raise core.ApiError(404, "not_found", "no such media for this tenant")
        path = await api.compute(api.media.local_path, content_hash)
        if mime == catalog.FRAME:
            mime = _image_type(path)
        return FileResponse(
            path,
            media_type=mime,
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    return [
        Route("/", page, methods=["GET"]),
        Route("/v1/media/{content_hash}", media, methods=["GET"]),
    ]


def _image_type(path) -> str:
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
