"""``/studio/v1/history``: the output folders' images, newest first, paged and searchable (the
History tab's listing for API clients), their thumbnails and files, and deleting one.

A1111 has no such routes; the paths are those :class:`~studio.generation.history.OutputHistory`
lists: relative to the data dir (absolute for an output folder outside it). Bad paths are 400s that
say why, a file that is gone a 404 (both through the ``route_class``'s error handling)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from studio.generation.history import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, HistoryItem, OutputHistory

PREFIX = "/studio/v1"
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def thumb_url(item: HistoryItem) -> str:
    # the mtime makes a replaced file a new URL, so a browser's cached thumbnail never goes stale
    return f"{PREFIX}/history/thumb?path={quote(item.rel, safe='')}&v={item.mtime:.0f}"


def build_history_router(studio: Any, route_class: Any, history: OutputHistory | None = None) -> APIRouter:
    """The routes over ``history`` (by default one over ``studio.paths.data`` and its settings)."""
    history = history or OutputHistory(studio.paths.data, lambda: studio.settings.options)
    r = APIRouter(prefix=PREFIX, tags=["history"], route_class=route_class)

    @r.get("/history")
    async def listing(page: int = Query(1, ge=1, description="1-based page number; past the end gives the last"),
                      size: int = Query(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
                      q: str = Query("", description="prompt words (all must match); model:<name or hash>; "
                                                     "date:<YYYY-MM-DD or a prefix>; negative:<word>")
                      ) -> dict[str, Any]:
        found = await run_in_threadpool(history.page, page - 1, size, q)
        return {"items": [{**item.summary(), "thumbnail": thumb_url(item)} for item in found.items],
                "total": found.total, "pages": found.pages, "page": found.index + 1, "size": found.size}

    @r.get("/history/thumb")
    async def thumbnail(path: str) -> FileResponse:
        thumb = await run_in_threadpool(history.thumbnail, path)
        return FileResponse(thumb, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @r.get("/history/image")
    async def image(path: str) -> FileResponse:
        target = await run_in_threadpool(history.resolve, path)
        return FileResponse(target, media_type=MEDIA_TYPES.get(target.suffix.lower(), "application/octet-stream"))

    @r.delete("/history")
    async def delete(path: str) -> dict[str, Any]:
        removed = await run_in_threadpool(history.delete, path)
        return {"deleted": [history.relative(p) for p in removed]}

    return r
