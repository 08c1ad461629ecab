"""ADetailer's own routes (``/adetailer/v1/...``) on the built-in Detailer, so clients that ask the
extension what it has (its version, the detector names) before sending ``alwayson_scripts.ADetailer``
work unchanged."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from studio.detailer import ADETAILER_COMPAT_VERSION, DetailerUnit


def build_adetailer_router(studio: Any, route_class: Any) -> APIRouter:
    r = APIRouter(prefix="/adetailer/v1", tags=["adetailer"], route_class=route_class)

    @r.get("/version")
    def version() -> dict[str, Any]:
        return {"version": ADETAILER_COMPAT_VERSION}

    @r.get("/schema")
    def schema() -> dict[str, Any]:
        return DetailerUnit.model_json_schema()

    @r.get("/ad_model")
    def ad_model() -> dict[str, Any]:
        return {"ad_model": studio.engine.detectors.names()}

    return r
