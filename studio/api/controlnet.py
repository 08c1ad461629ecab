"""sd-webui-controlnet's API on our engine: units in ``alwayson_scripts`` and the extension's own
``/controlnet/...`` routes, with its field names, response shapes and status codes, so clients
written for A1111 + the extension (webuiapi, Krita/Photoshop plugins, scripts) work unchanged."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from studio.controlnet.control_types import api_control_types
from studio.controlnet.pose_render import MAX_POSE_CANVAS, render_pose_json
from studio.controlnet.preprocessors import INPAINT_MODULES
from studio.controlnet.units import unit_count

# The extension's external_code.get_api_version(); clients check it before using units.
API_VERSION = 2


class PosePerson(BaseModel):
    """One person of an OpenPose JSON file: (x, y, confidence) triples in canvas pixels."""

    pose_keypoints_2d: list[float]
    hand_right_keypoints_2d: list[float] | None = None
    hand_left_keypoints_2d: list[float] | None = None
    face_keypoints_2d: list[float] | None = None


class PoseFile(BaseModel):
    """What pose editors save (OpenPose's output format): people, or AP-10K ``animals``, on a canvas.
    The extension's model requires ``people``; animal files have none, so here it defaults to empty."""

    people: list[PosePerson] = Field(default_factory=list)
    animals: list[list[float]] = Field(default_factory=list)
    canvas_width: int = Field(gt=0, le=MAX_POSE_CANVAS)
    canvas_height: int = Field(gt=0, le=MAX_POSE_CANVAS)


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    # webuiapi's controlnet_detect() sends this name instead (a known mismatch): accept both
    controlnet_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list)
    low_vram: bool = False


def build_controlnet_router(studio: Any, route_class: Any, decode: Callable[[str], Any],
                            encode: Callable[[Any], str]) -> APIRouter:
    r = APIRouter(prefix="/controlnet", tags=["controlnet"], route_class=route_class)

    @r.get("/version")
    def version() -> dict[str, Any]:
        return {"version": API_VERSION}

    @r.get("/model_list")
    def model_list(update: bool = True) -> dict[str, Any]:
        if update:
            studio.controlnets.library.refresh()
        return {"model_list": studio.controlnets.names()}

    @r.get("/module_list")
    def module_list(alias_names: bool = False) -> dict[str, Any]:
        # the extension's two listings: its internal names (false) or its UI names (true)
        return studio.preprocessors.api_module_detail(alias_names)

    @r.get("/settings")
    def settings() -> dict[str, Any]:
        return {"control_net_unit_count": unit_count(studio.settings)}

    @r.get("/control_types")
    def control_types() -> dict[str, Any]:
        return api_control_types(studio.preprocessors.names(), studio.controlnets.names())

    @r.post("/detect")
    def detect(body: DetectRequest = Body(...)) -> dict[str, Any]:
        if body.controlnet_module not in studio.preprocessors:
            raise HTTPException(422, "Module not available")
        images = body.controlnet_input_images or body.controlnet_images
        if not images:
            raise HTTPException(422, "No image selected")
        if studio.preprocessors.canonical(body.controlnet_module) in INPAINT_MODULES and not body.controlnet_masks:
            raise HTTPException(422, f"{body.controlnet_module} needs controlnet_masks (white = the area to generate)")
        decoded = [decode(data) for data in images]
        masks = [decode(data) for data in body.controlnet_masks]
        # out-of-range values fall back to the module's defaults in Engine.detect, as in a generation's units
        poses: list[dict] = []
        maps = studio.detect(body.controlnet_module, decoded, body.controlnet_processor_res,
                             body.controlnet_threshold_a, body.controlnet_threshold_b, masks=masks, poses=poses)
        answer: dict[str, Any] = {"info": "Success", "images": [encode(m) for m in maps]}
        if poses:   # the openpose modules: the keypoints too, as the extension answers
            answer["poses"] = poses
        return answer

    @r.post("/render_openpose_json")
    def render_openpose_json(pose_data: list[PoseFile] = Body([], title="Pose json files to render.")
                             ) -> dict[str, Any]:
        if not pose_data:
            return {"info": "No pose data detected."}   # the extension's answer (200)
        try:
            images = [render_pose_json(pose.model_dump()) for pose in pose_data]
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        return {"images": [encode(image) for image in images], "info": "Success"}

    return r

