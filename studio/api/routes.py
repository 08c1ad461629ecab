"""/sdapi/v1 routes: A1111 paths, field names and response shapes over the Studio."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from studio.api.adetailer import build_adetailer_router
from studio.api.auth import install_access
from studio.api.controlnet import build_controlnet_router
from studio.api.history import build_history_router
from studio.api.models import (
    FaceRestorerItem,
    ImageResponse,
    InterrogateRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ProgressState,
    RealesrganItem,
    ScriptInfo,
)
from studio.api.options import json_safe
from studio.api.training import build_training_router
from studio.controlnet.preprocessors import PreprocessorError
from studio.controlnet.units import SCRIPT_TITLE, ControlNetUnitRequest, unit_count
from studio.core import Studio
from studio.devices import memory_report
from studio.extensions import ExtensionError
from studio.generation.imageops import ImageInputError
from studio.generation.infotext import parse_infotext
from studio.generation.outputs import (
    ImageReadError,
    SaveFormat,
    image_bytes,
    open_image,
    png_bytes,
    read_infotext,
)
from studio.generation.request import (
    ALWAYSON_SCRIPTS,
    ExtrasBatchRequest,
    ExtrasSingleRequest,
    Img2ImgRequest,
    RequestError,
    Txt2ImgRequest,
    decode_image_input,
    fill_from_infotext,
)
from studio.generation.samplers import UnknownSamplerError, samplers_api, schedules_api
from studio.jobs import Job
from studio.merge import MergeRequest
from studio.models.manager import ModelNotFoundError
from studio.models.state_dict import ModelFileError
from studio.models.vae import VaeNotFoundError
from studio.networks.embeddings import EmbeddingFileError
from studio.networks.hypernetworks import HypernetworkFileError
from studio.networks.lora_formats import LoraFileError
from studio.options import validate_changes
from studio.prompts.styles import StyleError
from studio.upscale import UpscalerError

log = logging.getLogger("studio.api")

# Errors that mean "fix your request or your file": a 400 with the message as ``detail``.
USER_ERRORS = (RequestError, ModelFileError, ImageReadError, ImageInputError, UnknownSamplerError,
               VaeNotFoundError, StyleError, UpscalerError, PreprocessorError, LoraFileError,
               EmbeddingFileError, HypernetworkFileError, ExtensionError)
# UpscalerLibrary families (folder names) that are ESRGAN-type models: /realesrgan-models lists them.
ESRGAN_FAMILIES = ("esrgan", "realesrgan")


def decode_base64_image(data: str):
    if not isinstance(data, str) or not data:
        raise HTTPException(400, "image must be a base64 string")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(400, f"Invalid base64 image data: {e}") from e
    try:
        return open_image(raw)
    except ImageReadError as e:
        raise HTTPException(400, str(e)) from e


def encode_png(image, infotext: str | None) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def encode_image(image, infotext: str | None, fmt: str = "png", quality: int = 80, lossless: bool = False) -> str:
    """Base64 of ``image`` in the ``samples_format`` (A1111's ``encode_pil_to_base64``): PNG with the
    infotext in its ``parameters`` chunk, JPEG / WebP with it in the EXIF UserComment."""
    fmt = (fmt or "png").lower()
    save_format = SaveFormat("jpg" if fmt == "jpeg" else fmt if fmt in ("jpg", "webp") else "png", quality, lossless)
    return base64.b64encode(image_bytes(image, infotext, save_format)).decode("ascii")


async def wait_for(job: Job) -> Any:
    """The job's result, awaited without holding a worker thread: however many requests wait in
    the queue, the thread pool stays free for /progress, /interrupt and the rest."""
    delay = 0.005
    while not job.done.is_set():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return job.wait(0)


def build_router(studio: Studio) -> APIRouter:
    def image_format(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """How API images are encoded: ``samples_format``, ``jpeg_quality``, ``webp_lossless`` (the
        request's ``override_settings`` over the settings; both already validated)."""
        options = studio.settings.options
        if overrides:
            options = options.model_copy(update=validate_changes(overrides, options))
        return {"fmt": options.samples_format, "quality": options.jpeg_quality, "lossless": options.webp_lossless}

    def response_images(result: Any, send: bool, overrides: dict[str, Any] | None) -> list[str]:
        """The generated images, then (as the ControlNet extension does) each unit's detected map,
        unless the ``control_net_no_detectmap`` setting is on."""
        if not send:
            return []
        fmt = image_format(overrides)
        images = [encode_image(i, t, **fmt) for i, t in zip(result.images, result.infotexts)]
        if not studio.settings.get("control_net_no_detectmap", False):
            images += [encode_image(m, None, **fmt) for m in result.detected_maps]
        return images

    async def generate(body: Txt2ImgRequest) -> tuple[Any, dict[str, Any]]:
        """Queue the job (checked first, in the thread pool: images are decoded there), wait for it,
        then make the overrides permanent if the request says so."""
        job = await run_in_threadpool(lambda: studio.engine.submit(fill_from_infotext(body)))
        result = await wait_for(job)
        overrides = body.override_settings
        # Overrides travel with the request, so "restore afterwards" needs no work: the next
        # request runs on the user's settings again. Without restore they become the settings.
        if overrides and not body.override_settings_restore_afterwards:
            await run_in_threadpool(studio.apply_options, overrides)
        return result, overrides

    def image_response(result: Any, body: Txt2ImgRequest, overrides: dict[str, Any],
                       params: dict[str, Any]) -> dict[str, Any]:
        images = response_images(result, body.send_images, overrides)
        return {"images": images, "parameters": json_safe(params),
                "info": json.dumps(result.info(), ensure_ascii=False)}

    r = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], route_class=StudioRoute)

    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        result, overrides = await generate(body)
        return await run_in_threadpool(image_response, result, body, overrides, body.model_dump())

    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        result, overrides = await generate(body)
        params = body.model_dump()
        if not body.include_init_images:
            params["init_images"] = None  # A1111 leaves the (large) inputs out of the echo
            params["mask"] = None
        return await run_in_threadpool(image_response, result, body, overrides, params)

    # The bodies are the schema classes the studio was built with (studio.schemas), so a field added
    # to the schema is in the API and /docs at once.
    txt2img.__annotations__ = {**txt2img.__annotations__, "body": studio.schemas.txt2img}
    img2img.__annotations__ = {**img2img.__annotations__, "body": studio.schemas.img2img}
    r.post("/txt2img", response_model=ImageResponse)(txt2img)
    r.post("/img2img", response_model=ImageResponse)(img2img)

    @r.get("/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [c.api_dict() for c in studio.checkpoints()]

    @r.post("/refresh-checkpoints")
    def refresh_checkpoints() -> dict[str, Any]:
        studio.refresh_checkpoints()
        return {}

    @r.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return samplers_api()

    @r.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return schedules_api()

    @r.get("/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        return [v.api_dict() for v in studio.vaes.items()]

    @r.get("/sd-modules")
    def sd_modules() -> list[dict[str, Any]]:
        """Forge's list of VAE / text-encoder files for checkpoints that lack them (forge_additional_modules)."""
        return [{"model_name": m.name, "filename": str(m.path), "kind": m.kind, "storage": m.storage}
                for m in studio.engine.models.modules()]

    @r.post("/refresh-vae")
    def refresh_vae() -> dict[str, Any]:
        studio.refresh_vaes()
        return {}

    def extras(body: Any, data: Any) -> tuple[str, str]:
        out, info, _ = studio.engine.extras(body, decode_image_input(data))
        return encode_image(out, info, **image_format()), info

    @r.post("/extra-single-image")
    def extra_single_image(body: ExtrasSingleRequest) -> dict[str, Any]:
        image, info = extras(body, body.image)
        return {"html_info": f"<p>{info}</p>", "image": image if body.show_extras_results else None}

    @r.post("/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchRequest) -> dict[str, Any]:
        if not body.imageList:
            raise HTTPException(400, "imageList: at least one image is required")
        results = [extras(body, item.data) for item in body.imageList]
        images = [image for image, _ in results] if body.show_extras_results else []
        return {"html_info": f"<p>{results[0][1]}</p>", "images": images}

    @r.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        studio.upscalers.refresh()
        return studio.upscalers.api_list()

    @r.get("/realesrgan-models", response_model=list[RealesrganItem])
    def realesrgan_models() -> list[dict[str, Any]]:
        """A1111 lists its Real-ESRGAN upscaler's models here: ours are the ESRGAN-type model files
        of the upscaler list (models/ESRGAN, models/RealESRGAN)."""
        studio.upscalers.refresh()
        return [{"name": u.name, "path": str(u.path) if u.path else None, "scale": u.scale}
                for u in studio.upscalers.items()
                if u.kind == "model" and (u.family or "").lower() in ESRGAN_FAMILIES]

    @r.get("/face-restorers", response_model=list[FaceRestorerItem])
    def face_restorers() -> list[dict[str, Any]]:
        # what is really installed (models/GFPGAN, models/Codeformer): nothing can be downloaded here
        studio.engine.face_restorers.refresh()
        return studio.engine.face_restorers.api_list()

    @r.post("/interrogate")
    def interrogate(body: InterrogateRequest) -> dict[str, Any]:
        decode_base64_image(body.image)
        # A1111 answers an interrogator it does not have with 404 "Model not found"
        raise HTTPException(404, f"Model not found: {body.model!r}. This studio has no image interrogator "
                                 "(CLIP or DeepDanbooru), so it cannot caption images.")

    @r.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        from studio.upscale import latent_modes_api

        return latent_modes_api()

    @r.get("/loras")
    def loras() -> list[dict[str, Any]]:
        return [i.api_dict() for i in studio.networks.loras.items()]

    @r.post("/refresh-loras")
    def refresh_loras() -> dict[str, Any]:
        studio.networks.loras.refresh()
        return {}

    @r.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return studio.networks.hypernetworks.api_dict()

    @r.get("/options")
    def get_options() -> dict[str, Any]:
        opts = studio.settings.snapshot()
        current = studio.models.current
        if current is not None and not opts.get("sd_model_checkpoint"):
            opts["sd_model_checkpoint"] = current.info.title
            opts["sd_checkpoint_hash"] = current.info.sha256
        return json_safe(opts)  # a config.json edited by hand may hold what JSON replies cannot

    @r.post("/options")
    def set_options(body: dict[str, Any]) -> dict[str, Any]:
        studio.apply_options(body)
        return {}

    @r.get("/embeddings")
    def embeddings() -> dict[str, Any]:
        return studio.embeddings_api()

    @r.post("/refresh-embeddings")
    def refresh_embeddings() -> dict[str, Any]:
        studio.refresh_embeddings()
        return {}

    @r.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        studio.styles.reload()
        return [s.api_dict() for s in studio.styles.all()]

    @r.get("/extensions")
    def extensions() -> list[dict[str, Any]]:
        return studio.extensions.api_list()

    @r.get("/scripts")
    def scripts() -> dict[str, Any]:
        # A1111 lists every script of a tab, selectable and always-on, by lower-cased title; clients
        # (webuiapi's check_extensions) look for always-on script titles here
        names = studio.engine.scripts.api_names()
        return {tab: [*names[tab], *ALWAYSON_SCRIPTS] for tab in ("txt2img", "img2img")}

    @r.get("/script-info", response_model=list[ScriptInfo])
    def script_info() -> list[dict[str, Any]]:
        """A1111's ScriptInfo list: the always-on ControlNet script of each tab, one argument per
        unit (``control_net_unit_count``) whose value is a disabled unit with the defaults."""
        unit = ControlNetUnitRequest(enabled=False).as_dict()
        args = [{"label": f"ControlNet Unit {i}", "value": unit, "minimum": None, "maximum": None,
                 "step": None, "choices": None} for i in range(unit_count(studio.settings))]
        controlnet = [{"name": SCRIPT_TITLE, "is_alwayson": True, "is_img2img": is_img2img, "args": args}
                      for is_img2img in (False, True)]
        return [*studio.engine.scripts.api_info(studio.engine.script_env()), *controlnet]

    @r.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        flags = studio.flags.as_cmd_flags()
        for secret in ("api_auth", "gradio_auth"):  # logins are not for anyone who can read this
            if flags.get(secret):
                flags[secret] = "***"
        return flags

    @r.get("/memory")
    def memory() -> dict[str, Any]:
        report = memory_report(studio.policy.device)
        report["policy"] = studio.policy.label
        return report

    @r.post("/png-info", response_model=PNGInfoResponse)
    def png_info(body: PNGInfoRequest) -> dict[str, Any]:
        image = decode_base64_image(body.image)
        text = read_infotext(image) or ""
        items = {k: v for k, v in image.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @r.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        state = studio.queue.current
        count = studio.queue.job_count
        if state is None:
            return {"progress": 0, "eta_relative": 0, "state": ProgressState(job_count=count), "textinfo": None}
        preview = state.preview
        image = encode_image(preview, None, **image_format()) \
            if preview is not None and not skip_current_image else None
        return {
            "progress": state.progress,
            "eta_relative": state.eta or 0.0,
            "state": ProgressState(
                skipped=state.skipped, interrupted=state.interrupted, job=state.job_id, job_count=count,
                job_no=state.batch, sampling_step=state.step, sampling_steps=state.total,
            ),
            "current_image": image,
            "textinfo": state.textinfo,
            "current_task": state.job_id,
        }

    @r.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        studio.queue.interrupt()
        return {}

    @r.post("/skip")
    def skip() -> dict[str, Any]:
        studio.queue.skip()
        return {}

    @r.post("/unload-checkpoint")
    def unload_checkpoint() -> dict[str, Any]:
        studio.queue.run(lambda state: studio.models.unload(), "unload")
        return {}

    @r.post("/reload-checkpoint")
    def reload_checkpoint() -> dict[str, Any]:
        studio.select_checkpoint(studio.settings.get("sd_model_checkpoint"))
        return {}

    return r


def build_queue_router(studio: Studio) -> APIRouter:
    """The studio's queue (A1111 has no such routes; the queue panel shows the same): the running job,
    the jobs waiting behind it with their typed requests' main fields and places in line, the recently
    finished ones; cancelling a waiting job and moving it up or down the line."""
    from fastapi import Body

    moves = ("up", "down", "first", "last")
    move_help = (f"a place in line (1 = runs next), one of {', '.join(moves)}, or {{\"before\": id}} / "
                 "{\"after\": id} of another waiting job")

    r = APIRouter(prefix="/studio/v1", tags=["queue"], route_class=StudioRoute)

    @r.post("/merge")
    def merge(body: MergeRequest) -> dict[str, Any]:
        """A1111's Checkpoint Merger (A1111 has no API route for it): a queued job; the new file is in
        GET /sdapi/v1/sd-models when this returns."""
        return studio.merge_checkpoints(body).api_dict()

    def not_waiting(job_id: str) -> HTTPException:
        where = studio.queue.position(job_id)
        if where == 0:
            return HTTPException(404, f"{job_id} is running, not waiting: stop it with POST /sdapi/v1/interrupt")
        return HTTPException(404, f"no waiting job {job_id!r}: it has finished or was cancelled, or never "
                                  "existed (GET /studio/v1/queue lists the waiting ones)")

    @r.get("/queue")
    def queue() -> dict[str, Any]:
        """``running`` (position 0, with its progress), ``waiting`` (position 1 = runs next), ``recent``
        (the last finished jobs, newest first, with ``outcome``: done, interrupted, failed or cancelled)
        and ``job_count`` (as /sdapi/v1/progress)."""
        return json_safe(studio.queue.snapshot().as_dict())

    @r.get("/workers")
    def workers() -> dict[str, Any]:
        """The generation workers (with --workers / --ray-address; otherwise this process as the one
        worker): id, node, pid, device, loaded checkpoints, state, the job it runs, jobs done; the Ray
        dashboard's link when it runs."""
        return json_safe(studio.workers_status())

    @r.delete("/queue/{job_id}")
    def cancel(job_id: str) -> dict[str, Any]:
        if not studio.queue.cancel(job_id):
            raise not_waiting(job_id)
        return {"cancelled": job_id}

    # the body's type is checked here rather than by a pydantic model: this module's annotations are
    # strings, resolved in its globals, where a model defined in this function cannot be found
    @r.post("/queue/{job_id}/move")
    def move(job_id: str, to: Any = Body(embed=True, description=(
            "the job's new place in line: 1 = runs next (as `position` in GET /studio/v1/queue; past the end "
            "= last), one of 'up', 'down', 'first', 'last', or {\"before\": id} / {\"after\": id} of another "
            "waiting job (what a drag and drop in the queue panel does)"))) -> dict[str, Any]:
        """Reorder a waiting job: ``{"to": 2}``, ``{"to": "up"}`` or ``{"to": {"after": "task(7)"}}``;
        answers its new place in line."""
        beside = next(iter(to.items())) if isinstance(to, dict) and len(to) == 1 else None
        if isinstance(to, dict):
            if beside is None or beside[0] not in ("before", "after") or not isinstance(beside[1], str):
                raise HTTPException(422, f"to: {move_help}; got {json.dumps(to)}")
        elif isinstance(to, bool) or not (isinstance(to, int) and to >= 1 or to in moves):
            raise HTTPException(422, f"to: {move_help}; got {json.dumps(to)}")
        q = studio.queue
        if beside is not None:
            side, other = beside
            if not q.position(other):   # None: not queued at all; 0: already running
                raise HTTPException(404, f"to: {other!r} is not a waiting job (GET /studio/v1/queue lists them)")
            position = q.place(job_id, other, after=side == "after")
        elif to == "up":
            position = q.shift(job_id, -1)
        elif to == "down":
            position = q.shift(job_id, 1)
        elif to == "first":
            position = q.move(job_id, 0)
        elif to == "last":
            position = q.move(job_id, len(q.waiting()))
        else:
            position = q.move(job_id, to - 1)
        if position is None:
            raise not_waiting(job_id)
        return {"id": job_id, "position": position}

    return r


def build_server_router(studio: Studio, shutdown: Callable[[], None]) -> APIRouter:
    """A1111's server-kill / server-stop / server-restart, served only with --api-server-stop.
    ``shutdown`` closes the server the way Ctrl+C does."""
    r = APIRouter(prefix="/sdapi/v1", tags=["server"], route_class=StudioRoute)

    @r.post("/server-kill")
    def server_kill() -> dict[str, Any]:
        log.warning("POST /sdapi/v1/server-kill: exiting now")
        threading.Timer(0.2, os._exit, args=(0,)).start()  # after the reply has gone out
        return {}

    @r.post("/server-stop")
    def server_stop() -> PlainTextResponse:
        log.warning("POST /sdapi/v1/server-stop: interrupting the current job and shutting down")
        studio.queue.interrupt()

        def stop() -> None:
            time.sleep(0.2)  # let the reply go out first
            shutdown()
            time.sleep(30)
            os._exit(0)  # still here: shutting down hung

        # a daemon thread: once the server has closed, nothing keeps the process alive
        threading.Thread(target=stop, name="server-stop", daemon=True).start()
        return PlainTextResponse("Stopping.")

    @r.post("/server-restart", status_code=501)
    def server_restart() -> JSONResponse:
        # as A1111 answers when it was not started by a launcher that restarts it
        return JSONResponse({"detail": "Restarting needs a launcher that starts the studio again: stop it "
                                       "with /sdapi/v1/server-stop and start it again."}, status_code=501)

    return r


class StudioRoute(APIRoute):
    """Turns errors into A1111-style JSON replies: user errors into a 4xx with ``{"detail": ...}``,
    anything unexpected into a 500 with ``{"error", "detail", "body", "errors"}`` (A1111's
    ``handle_exception``) and a logged traceback. Done per route rather than with app exception
    handlers because the API is added to Gradio's app after it started, when Starlette no longer
    picks up new handlers."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                # FastAPI's own reply would echo the bad input, and a NaN or an infinity in it makes
                # that reply unencodable (a plain-text 500 that drops the connection)
                return JSONResponse({"detail": json_safe(jsonable_encoder(e.errors()))}, status_code=422)
            except (StarletteHTTPException, WebSocketRequestValidationError):
                raise  # FastAPI's own replies (4xx with a JSON detail)
            except ModelNotFoundError as e:
                return JSONResponse({"detail": str(e).strip("'\""), "error": type(e).__name__},
                                    status_code=404)
            except USER_ERRORS as e:
                return JSONResponse({"detail": str(e), "error": type(e).__name__},
                                    status_code=getattr(e, "status", 400))
            except Exception as e:  # noqa: BLE001 - a bug must still answer in JSON, and be logged
                log.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse({"error": type(e).__name__, "detail": str(e) or type(e).__name__,
                                     "body": "", "errors": str(e)}, status_code=500)

        return guarded


def close_server(app: FastAPI) -> None:
    """Stop serving, as Ctrl+C does: Gradio's ``Blocks.close()`` ends ``block_thread()``; an API-only
    server (uvicorn running in the main thread) stops on SIGTERM."""
    blocks = getattr(app, "blocks", None)
    if blocks is not None:
        blocks.close()
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def install_api(app: FastAPI, studio: Studio) -> None:
    """Every API router on ``app``: /sdapi/v1 (with training and, with --api-server-stop, the
    server routes) and /controlnet, behind the --api-auth login if one is set; CORS if the flags
    allow other origins."""
    deps = install_access(app, studio.flags)
    app.include_router(build_router(studio), dependencies=deps)
    app.include_router(build_adetailer_router(studio, StudioRoute), dependencies=deps)
    app.include_router(build_controlnet_router(studio, StudioRoute, decode_base64_image,
                                               lambda image: encode_png(image, None)), dependencies=deps)
    app.include_router(build_training_router(studio, StudioRoute), dependencies=deps)
    app.include_router(build_queue_router(studio), dependencies=deps)
    app.include_router(build_history_router(studio, StudioRoute), dependencies=deps)
    if studio.flags.api_server_stop:
        app.include_router(build_server_router(studio, lambda: close_server(app)), dependencies=deps)
    # FastAPI builds /openapi.json once, on the first request: drop a copy made before these routes
    app.openapi_schema = None
