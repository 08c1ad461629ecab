"""/sdapi/v1 routes: A1111 paths, field names and response shapes over the Studio."""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from studio.api.controlnet import build_controlnet_router, units_from_alwayson
from studio.api.models import (
    ExtrasBatchRequest,
    ExtrasSingleRequest,
    ImageResponse,
    Img2ImgAPIRequest,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    ProgressState,
    Txt2ImgAPIRequest,
)
from studio.api.training import build_training_router
from studio.core import Studio
from studio.devices import memory_report
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.outputs import ImageReadError, open_image, png_bytes, read_infotext
from studio.generation.request import Img2ImgRequest, RequestError, Txt2ImgRequest
from studio.generation.samplers import samplers_api, schedules_api
from studio.models.manager import ModelNotFoundError
from studio.models.state_dict import ModelFileError


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


def to_img2img_request(body: Img2ImgAPIRequest, studio: Studio) -> Img2ImgRequest:
    """A1111 img2img fields on top of the txt2img mapping. ``mask_blur`` (old clients) sets
    both axes; images may be raw base64 or data URIs."""
    if not body.init_images:
        raise HTTPException(400, "init_images: at least one base64 image is required")
    base, _ = to_request(body, studio)
    images = tuple(decode_base64_image(data) for data in body.init_images)
    mask = decode_base64_image(body.mask) if body.mask else None
    blur_x, blur_y = body.mask_blur_x, body.mask_blur_y
    if body.mask_blur is not None:
        blur_x = blur_y = body.mask_blur
    strength = body.denoising_strength if body.denoising_strength is not None else 0.75
    fields = {k: getattr(base, k) for k in Txt2ImgRequest.__dataclass_fields__}
    return Img2ImgRequest(
        **fields, init_images=images, mask=mask, resize_mode=body.resize_mode, denoising_strength=strength,
        mask_blur_x=blur_x, mask_blur_y=blur_y, inpainting_fill=body.inpainting_fill,
        inpaint_full_res=bool(body.inpaint_full_res), inpaint_full_res_padding=body.inpaint_full_res_padding,
        inpainting_mask_invert=bool(body.inpainting_mask_invert),
    )


def to_request(body: Txt2ImgAPIRequest, studio: Studio) -> tuple[Txt2ImgRequest, str | None]:
    """Map A1111 fields to our request. Returns the request and the checkpoint override."""
    explicit = body.model_fields_set
    values = body.model_dump()
    if body.infotext:
        for name, value in infotext_to_fields(parse_infotext(body.infotext)).items():
            if name in Txt2ImgRequest.__dataclass_fields__ and name not in explicit:
                values[name] = value
    overrides = body.override_settings or {}
    checkpoint = overrides.get("sd_model_checkpoint")
    vae = overrides.get("sd_vae")
    clip_skip = values.get("clip_skip") or overrides.get("CLIP_stop_at_last_layers") \
        or studio.settings.get("CLIP_stop_at_last_layers", 1)
    sampler = values.get("sampler_name") or values.get("sampler_index") or "Euler"
    req = Txt2ImgRequest(
        prompt=values["prompt"] or "",
        negative_prompt=values["negative_prompt"] or "",
        steps=values["steps"],
        cfg_scale=values["cfg_scale"],
        width=values["width"],
        height=values["height"],
        seed=values["seed"],
        batch_size=values["batch_size"],
        n_iter=values["n_iter"],
        sampler_name=sampler,
        scheduler=values.get("scheduler") or "Automatic",
        clip_skip=int(clip_skip),
        eta=values.get("eta"),
        subseed=int(values.get("subseed", -1)),
        subseed_strength=float(values.get("subseed_strength") or 0),
        seed_resize_from_w=max(0, int(values.get("seed_resize_from_w") or 0)),
        seed_resize_from_h=max(0, int(values.get("seed_resize_from_h") or 0)),
        tiling=bool(values.get("tiling")),
        enable_hr=bool(values.get("enable_hr")),
        hr_scale=float(values.get("hr_scale") or 2.0),
        hr_upscaler=values.get("hr_upscaler") or "Latent",
        hr_second_pass_steps=int(values.get("hr_second_pass_steps") or 0),
        hr_resize_x=int(values.get("hr_resize_x") or 0),
        hr_resize_y=int(values.get("hr_resize_y") or 0),
        # A1111 reuses denoising_strength for the hires pass in txt2img
        hr_denoising_strength=float(values["denoising_strength"]) if values.get("denoising_strength") is not None
        else 0.7,
        hr_sampler_name=values.get("hr_sampler_name") or None,
        hr_scheduler=values.get("hr_scheduler") or None,
        hr_prompt=values.get("hr_prompt") or "",
        hr_negative_prompt=values.get("hr_negative_prompt") or "",
        checkpoint=checkpoint,
        vae=str(vae) if vae is not None else None,
        save_images=bool(values["save_images"]),
        styles=tuple(values.get("styles") or ()),
        controlnet_units=units_from_alwayson(body.alwayson_scripts, decode_base64_image),
    )
    return req, checkpoint


def build_router(studio: Studio) -> APIRouter:
    def response_images(result: Any, send: bool) -> list[str]:
        """The generated images, then (as the ControlNet extension does) each unit's detected map,
        unless the ``control_net_no_detectmap`` setting is on."""
        if not send:
            return []
        images = [encode_png(i, t) for i, t in zip(result.images, result.infotexts)]
        if not studio.settings.get("control_net_no_detectmap", False):
            images += [encode_png(m, None) for m in result.detected_maps]
        return images

    r = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], route_class=StudioRoute)

    @r.post("/txt2img", response_model=ImageResponse)
    def txt2img(body: Txt2ImgAPIRequest) -> dict[str, Any]:
        req, _override = to_request(body, studio)
        result = studio.txt2img(req)
        # Overrides travel with the request, so "restore afterwards" needs no work: the next
        # request runs on the user's settings again. Without restore they become the settings.
        if body.override_settings and not body.override_settings_restore_afterwards:
            studio.apply_options(dict(body.override_settings))
        images = response_images(result, body.send_images)
        params = body.model_dump()
        return {"images": images, "parameters": params, "info": json.dumps(result.info(), ensure_ascii=False)}

    @r.post("/img2img", response_model=ImageResponse)
    def img2img(body: Img2ImgAPIRequest) -> dict[str, Any]:
        req = to_img2img_request(body, studio)
        result = studio.img2img(req)
        if body.override_settings and not body.override_settings_restore_afterwards:
            studio.apply_options(dict(body.override_settings))
        images = response_images(result, body.send_images)
        params = body.model_dump()
        if not body.include_init_images:
            params["init_images"] = None  # A1111 leaves the (large) inputs out of the echo
            params["mask"] = None
        return {"images": images, "parameters": params, "info": json.dumps(result.info(), ensure_ascii=False)}

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

    @r.post("/refresh-vae")
    def refresh_vae() -> dict[str, Any]:
        studio.refresh_vaes()
        return {}

    def extras(body: Any, data: str) -> tuple[str, str]:
        image = decode_base64_image(data)
        scale, size = (body.upscaling_resize, None) if body.resize_mode == 0 else \
            (None, (body.upscaling_resize_w, body.upscaling_resize_h))
        out, info, _ = studio.upscale_image(image, body.upscaler_1, scale=scale, size=size,
                                            upscaler_2=body.upscaler_2,
                                            visibility_2=body.extras_upscaler_2_visibility)
        return encode_png(out, info), info

    @r.post("/extra-single-image")
    def extra_single_image(body: ExtrasSingleRequest) -> dict[str, Any]:
        image, info = extras(body, body.image)
        return {"html_info": f"<p>{info}</p>", "image": image}

    @r.post("/extra-batch-images")
    def extra_batch_images(body: ExtrasBatchRequest) -> dict[str, Any]:
        if not body.imageList:
            raise HTTPException(400, "imageList: at least one image is required")
        results = [extras(body, item.data) for item in body.imageList]
        return {"html_info": f"<p>{results[0][1]}</p>", "images": [image for image, _ in results]}

    @r.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        studio.upscalers.refresh()
        return studio.upscalers.api_list()

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
        return opts

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
        # clients (webuiapi's check_extensions) look for always-on script titles here
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @r.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return studio.flags.as_cmd_flags()

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
        image = None
        if state.preview is not None and not skip_current_image:
            buf = io.BytesIO()
            state.preview.save(buf, format="PNG")
            image = base64.b64encode(buf.getvalue()).decode("ascii")
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


class StudioRoute(APIRoute):
    """Turns user errors into A1111-style ``{"detail": ...}`` 4xx replies. Done per route
    rather than with app exception handlers because the API is added to Gradio's app after
    it started, when Starlette no longer picks up new handlers."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except (RequestError, ModelFileError) as e:
                return JSONResponse({"detail": str(e), "error": type(e).__name__}, status_code=400)
            except ModelNotFoundError as e:
                return JSONResponse({"detail": str(e).strip("'\""), "error": type(e).__name__},
                                    status_code=404)

        return guarded


def install_api(app: FastAPI, studio: Studio) -> None:
    app.include_router(build_router(studio))
    app.include_router(build_controlnet_router(studio, StudioRoute, decode_base64_image,
                                               lambda image: encode_png(image, None)))
    app.include_router(build_training_router(studio, StudioRoute))
