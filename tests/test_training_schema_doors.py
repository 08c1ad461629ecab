"""Training is one schema too: a field added to the LoRA training settings (here in a test-only subclass)
shows in ``studio train lora --help``, in the /sdapi/v1/train/lora body of /openapi.json and in the Train
tab, and reaches the engine; the same mistake gets the same words from the CLI and the API; the CLI's
flags are the schema's, with the older names still working."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import Field

from studio.api.routes import StudioRoute
from studio.api.training import build_training_router
from studio.cli import build_parser, main, training_request
from studio.config import Flags
from studio.core import Studio
from studio.errors import RequestError
from studio.generation.request import RequestSchemas
from studio.training import runner
from studio.training.schemas import TrainHypernetworkRequest, TrainingSchemas, TrainLoraRequest
from studio.ui.train import build_train_tab, lora_request_from_values


class GlowLora(TrainLoraRequest):
    glow_strength: float = Field(0.25, ge=0, le=2, description="how much the LoRA glows (test-only field)")


@dataclass(frozen=True)
class GlowSchemas(RequestSchemas):
    training: TrainingSchemas = field(default_factory=lambda: TrainingSchemas(lora=GlowLora))


SCHEMAS = GlowSchemas()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    s = Studio.create(Flags(data_dir=str(tmp_path_factory.mktemp("traindoors"))), schemas=SCHEMAS)
    yield s
    s.queue.shutdown()


@pytest.fixture(scope="module")
def client(studio):
    app = FastAPI()
    app.include_router(build_training_router(studio, StudioRoute))
    return TestClient(app)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("traindoors_data")
    Image.new("RGB", (256, 256), (200, 30, 30)).save(folder / "square.png")
    (folder / "square.txt").write_text("a red square", encoding="utf-8")
    return folder


def cli_help(capsys, schemas, *args: str) -> str:
    with pytest.raises(SystemExit):
        build_parser(schemas).parse_args([*args, "--help"])
    return " ".join(capsys.readouterr().out.split())   # argparse wraps lines


def test_a_new_field_is_a_train_flag(capsys):
    assert "--glow-strength GLOW_STRENGTH how much the LoRA glows (test-only field) (default 0.25) [0 to 2]" \
        in cli_help(capsys, SCHEMAS, "train", "lora")
    ns = build_parser(SCHEMAS).parse_args(["train", "lora", "--data", "d", "--name", "n", "--glow-strength", "1.5"])
    req = training_request(ns, SCHEMAS)
    assert isinstance(req.settings, GlowLora) and req.settings.glow_strength == 1.5 and req.lora is req.settings
    # the studio's own schema has no such flag
    assert "--glow-strength" not in cli_help(capsys, None, "train", "lora")


def test_a_new_field_is_in_the_api_schema(client):
    spec = client.get("/openapi.json").json()
    ref = spec["paths"]["/sdapi/v1/train/lora"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = spec["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]
    props = body["properties"]
    assert props["glow_strength"]["maximum"] == 2 and props["glow_strength"]["default"] == 0.25
    assert props["rank"]["minimum"] == 1 and props["wait"]["default"] is True
    assert props["lr_scheduler"]["enum"] == ["constant", "constant_with_warmup", "cosine", "linear"]
    assert sorted(body["required"]) == ["output_name", "train_data_dir"]


def test_out_of_range_is_the_same_words_from_the_cli_and_the_api(client, capsys, dataset):
    for name, flag, value in (("glow_strength", "--glow-strength", 5), ("rank", "--rank", 0)):
        reply = client.post("/sdapi/v1/train/lora", json={"train_data_dir": str(dataset), "output_name": "x",
                                                          name: value})
        assert reply.status_code == 422
        api_msg = reply.json()["detail"][0]["msg"]
        ns = build_parser(SCHEMAS).parse_args(["train", "lora", "--data", str(dataset), "--name", "x",
                                               flag, str(value)])
        with pytest.raises(RequestError) as e:
            training_request(ns, SCHEMAS)
        assert str(e.value).startswith(f"{name}: {api_msg} (got {value}")   # 5.0: the flag is a float
    # the command itself says it (the studio's own schema)
    code = main(["train", "lora", "--data", str(dataset), "--name", "x", "--rank", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: rank: Input should be greater than or equal to 1 (got 0)"


def test_a_new_field_gets_a_train_tab_control_and_reaches_the_engine(studio, dataset):
    with gr.Blocks() as blocks, gr.Tab("Train"):
        forms = build_train_tab(studio)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert "train_lora_glow_strength" in ids and "train_lora_rank" in ids
    form = forms["lora"]
    glow = next(c for c in form.inputs() if c.elem_id == "train_lora_glow_strength")
    data = {c: c.value for c in form.inputs()}
    name = next(c for c in form.inputs() if c.elem_id == "train_lora_name")
    folder = next(c for c in form.inputs() if c.elem_id == "train_lora_data_dir")
    data.update({glow: 1.25, name: "glowing", folder: str(dataset)})
    req = lora_request_from_values(studio, form.values(data))
    prepared = runner.prepare(studio.engine, req)
    assert prepared.request.settings.glow_strength == 1.25 and prepared.request.lora.glow_strength == 1.25


def test_required_fields_are_required_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "lora", "--name", "x"])
    assert "the following arguments are required: --train-data-dir/--data" in capsys.readouterr().err
    text = cli_help(capsys, None, "train", "lora")
    assert "PydanticUndefined" not in text
    # a training field named like a generation field shows its own default
    assert "--steps STEPS optimizer steps (kohya max_train_steps) (default 1000) [1 to 1000000]" in text


def test_older_flag_names_and_kind_defaults():
    ns = build_parser().parse_args(["train", "lora", "--data", "d", "--name", "n", "--lr", "3e-4", "--scheduler",
                                    "cosine", "--warmup", "5", "--grad-accum", "2", "--shuffle-tags", "--no-bucket",
                                    "--min-bucket", "64", "--max-bucket", "512", "--te-lr", "1e-5", "-m", "tiny"])
    s = training_request(ns).settings
    assert (s.learning_rate, s.lr_scheduler, s.lr_warmup_steps, s.gradient_accumulation) == (3e-4, "cosine", 5, 2)
    assert s.shuffle_caption and not s.enable_bucket and (s.min_bucket_reso, s.max_bucket_reso) == (64, 512)
    assert s.text_encoder_lr == 1e-5 and s.checkpoint == "tiny" and s.steps == 1000
    hn = training_request(build_parser().parse_args(["train", "hypernetwork", "--data", "d", "--name", "h"]))
    assert isinstance(hn.settings, TrainHypernetworkRequest) and hn.learn_rate == "0.00001"
    # what a schedule replaces is no flag of an embedding's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "embedding", "--data", "d", "--name", "e", "--warmup", "5"])


def test_a1111_train_body_out_of_range_is_a_400_naming_the_field(client, dataset):
    reply = client.post("/sdapi/v1/train/embedding", json={"embedding_name": "x", "data_root": str(dataset),
                                                            "steps": 0})
    assert reply.status_code == 400
    assert reply.json()["detail"] == "steps: Input should be greater than or equal to 1 (got 0)"
