"""Training over HTTP: A1111's create/train routes (same paths, field names and replies), plus
``/sdapi/v1/train/lora`` of ours, whose body is the studio's LoRA training schema
(studio.training.schemas) plus ``wait``: a value out of its range is a 422 with pydantic's words, as
on the generation routes; what needs the files (the dataset, the name, an existing output) is a 400.
Every route builds a TrainingRequest for the same trainer the Train tab and the CLI use; training
routes block until the run ends, as A1111's do, unless a LoRA request says ``"wait": false``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, create_model

from studio.generation.request import build_request
from studio.training.base import TrainingError, TrainSettings
from studio.training.schemas import EMBEDDING_LR, HYPERNETWORK_LR, TrainLoraRequest, training_schemas

# A1111's prompt template files → our built-in templates
TEMPLATE_FILES = {"subject.txt": "subject", "subject_filewords.txt": "subject_filewords", "style.txt": "style",
                  "style_filewords.txt": "style_filewords", "none.txt": "none"}


class CreateEmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    num_vectors_per_token: int = 1
    overwrite_old: bool = False
    init_text: str = "*"


class CreateHypernetworkBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    enable_sizes: list[int] = Field(default_factory=lambda: [768, 320, 640, 1280])
    overwrite_old: bool = False
    layer_structure: list[float] | str | None = None
    activation_func: str | None = None
    weight_init: str | None = "Normal"
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | str | None = None


class TrainA1111Body(BaseModel):
    """The fields of A1111's ``train_embedding`` / ``train_hypernetwork``; those a studio run has no
    use for (log directory, latent sampling method, PNG alpha weights) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    embedding_name: str | None = None
    hypernetwork_name: str | None = None
    learn_rate: str | float | None = None
    batch_size: int = 1
    gradient_step: int = 1
    data_root: str
    training_width: int = 512
    training_height: int = 512
    varsize: bool = False
    steps: int = 100000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str | float = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    create_image_every: int = 0
    save_embedding_every: int = 0
    save_hypernetwork_every: int = 0
    template_filename: str = "subject_filewords.txt"
    preview_prompt: str = ""
    preview_steps: int = 20
    preview_seed: int = -1


def lora_body_model(schema: type[TrainLoraRequest] = TrainLoraRequest) -> type[BaseModel]:
    """The body of POST /sdapi/v1/train/lora: every field of the LoRA training schema, plus ``wait``."""
    return create_model("TrainLoraBody", __base__=schema,
                        wait=(bool, Field(True, description="wait for the run to end; false: queue it and "
                                                            "answer at once with its job id")))


def _a1111_settings(body: TrainA1111Body, name: str, save_every: int) -> TrainSettings:
    template = TEMPLATE_FILES.get(body.template_filename, body.template_filename.removesuffix(".txt"))
    grad = 0.0
    if body.clip_grad_mode in ("norm", "value"):
        try:
            grad = float(body.clip_grad_value)
        except (TypeError, ValueError) as e:
            raise TrainingError(f"clip_grad_value must be a number (got {body.clip_grad_value!r})") from e
    resolution = max(body.training_width, body.training_height)
    # A1111's body is not the studio's schema: its values are checked as settings (a 400 naming the field)
    return build_request(TrainSettings, {
        "train_data_dir": body.data_root, "output_name": name, "steps": body.steps,
        "batch_size": body.batch_size, "gradient_accumulation": body.gradient_step, "resolution": resolution,
        "min_bucket_reso": min(256, resolution), "max_bucket_reso": max(1024, resolution),
        "enable_bucket": body.varsize, "shuffle_caption": body.shuffle_tags, "tag_dropout": body.tag_drop_out,
        "template": template, "max_grad_norm": grad, "save_every": save_every,
        "sample_every": body.create_image_every, "sample_prompt": body.preview_prompt,
        "sample_steps": body.preview_steps, "seed": max(body.preview_seed, 0), "resume": True})


def build_training_router(studio: Any, route_class: Any) -> APIRouter:
    from studio.training.runner import TrainingRequest

    r = APIRouter(prefix="/sdapi/v1", tags=["training"], route_class=route_class)

    @r.post("/create/embedding")
    def create_embedding(body: CreateEmbeddingBody) -> dict[str, Any]:
        path = studio.create_embedding(body.name, body.init_text, body.num_vectors_per_token, body.overwrite_old)
        return {"info": f"create embedding filename: {path}"}

    @r.post("/create/hypernetwork")
    def create_hypernetwork(body: CreateHypernetworkBody) -> dict[str, Any]:
        options: dict[str, Any] = {"sizes": tuple(body.enable_sizes), "overwrite": body.overwrite_old,
                                   "add_layer_norm": body.add_layer_norm, "use_dropout": body.use_dropout}
        for key, value in (("layer_structure", body.layer_structure), ("activation", body.activation_func),
                           ("weight_init", body.weight_init), ("dropout_structure", body.dropout_structure)):
            if value is not None:
                options[key] = ", ".join(f"{v:g}" for v in value) if isinstance(value, list) else value
        path = studio.create_hypernetwork(body.name, **options)
        return {"info": f"create hypernetwork filename: {path}"}

    def train_a1111(kind: str, body: TrainA1111Body, name: str | None, default_lr: str, save_every: int):
        if not name:
            raise TrainingError(f"{kind}_name is required")
        req = TrainingRequest(kind, _a1111_settings(body, name, save_every),
                              learn_rate=str(body.learn_rate if body.learn_rate is not None else default_lr))
        result = studio.submit_training(req).wait()
        error = "; ".join(result.notes) if result.interrupted else None
        return {"info": f"train {kind} complete: filename: {result.output_path} error: {error}",
                "result": result.api_dict()}

    @r.post("/train/embedding")
    def train_embedding(body: TrainA1111Body) -> dict[str, Any]:
        return train_a1111("embedding", body, body.embedding_name, EMBEDDING_LR, body.save_embedding_every)

    @r.post("/train/hypernetwork")
    def train_hypernetwork(body: TrainA1111Body) -> dict[str, Any]:
        return train_a1111("hypernetwork", body, body.hypernetwork_name, HYPERNETWORK_LR,
                           body.save_hypernetwork_every)

    schema = training_schemas(studio.schemas).lora

    def train_lora(body: Any) -> dict[str, Any]:
        settings = schema.model_validate(body.model_dump(exclude={"wait"}))
        job = studio.submit_training(TrainingRequest("lora", settings))
        if not body.wait:
            return {"info": "queued", "job": job.state.job_id}
        result = job.wait()
        return {"info": f"train lora complete: filename: {result.output_path}", "result": result.api_dict()}

    # the body is the studio's schema, so the annotation is set on the function itself
    train_lora.__annotations__["body"] = lora_body_model(schema)
    r.post("/train/lora")(train_lora)

    return r
