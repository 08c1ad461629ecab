"""A1111 response shapes and the small request bodies of /sdapi/v1 (field names and defaults as in
A1111's ``modules/api/models.py``). The generation bodies are the engine's own schema
(studio.generation.request)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ImageResponse(BaseModel):
    images: list[str] | None = None
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class InterrogateRequest(BaseModel):
    image: str = ""
    model: str = "clip"


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None = None


class RealesrganItem(BaseModel):
    name: str
    path: str | None = None
    scale: int | None = None


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str
    is_alwayson: bool
    is_img2img: bool
    args: list[ScriptArg]
