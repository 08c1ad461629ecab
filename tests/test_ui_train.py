"""The Train tab without a browser: it builds, its values become the right training requests, bad
values are said, the dataset preview, the loss plot, streaming a job, and creating an embedding."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.training.base import TrainSettings
from studio.training.dataset import DEFAULT_TEMPLATES
from studio.training.loop import TrainResult
from studio.training.lora import LoraSettings
from studio.ui.train import (
    build_train_tab,
    create_embedding,
    create_hypernetwork,
    embedding_choices,
    interrupt_training,
    lora_request_from_values,
    loss_plot_value,
    preview_dataset,
    refresh_embeddings,
    result_summary,
    stream_training,
    ti_request_from_values,
    training_progress_html,
)
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("uitrain")
    make_models_dir(root)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uitrain_data")
    Image.new("RGB", (96, 96), (200, 30, 30)).save(folder / "square.png")
    (folder / "square.txt").write_text("a red square", encoding="utf-8")
    Image.new("RGB", (128, 64), (30, 200, 30)).save(folder / "wide.png")
    (folder / "wide.txt").write_text("a green band", encoding="utf-8")
    Image.new("RGB", (96, 96), (30, 30, 200)).save(folder / "00007-a_blue_tile.png")   # no caption file
    (folder / "3_extra").mkdir()
    Image.new("RGB", (96, 96), (90, 90, 90)).save(folder / "3_extra" / "grey.png")
    (folder / "3_extra" / "grey.txt").write_text("grey", encoding="utf-8")
    return folder


# The LoRA form's values as RequestForm.values gives them: the schema's field names.
LORA_VALUES = dict(
    output_name="my_lora", train_data_dir="", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.5, train_unet=True,
    train_text_encoder=True, unet_lr="2e-4", text_encoder_lr=None, dropout=0.1, learning_rate="1e-4",
    lr_scheduler="cosine", lr_warmup_steps=5, optimizer="AdamW8bit", mixed_precision="bf16", steps=100,
    batch_size=2, gradient_accumulation=3, max_grad_norm=0.5, resolution=640, enable_bucket=False,
    min_bucket_reso=128, max_bucket_reso=768, caption_extension=".caption", shuffle_caption=True, keep_tokens=1,
    caption_dropout=0.05, tag_dropout=0.1, noise_offset=0.03, min_snr_gamma=5.0, clip_skip=2, seed=42,
    save_every=25, sample_every=50, sample_prompt="a cat", sample_steps=12, overwrite=True, resume=False,
)

# The "Train embedding / hypernetwork" form: shared fields, and each kind's name and learning rate.
TI_VALUES = dict(
    embedding="emb_a", hypernetwork="hn_a", embedding_lr="0.005:100, 1e-5", hypernetwork_lr="0.00001",
    batch_size=2, gradient_accumulation=1, train_data_dir="", template="style_filewords", resolution=128,
    min_bucket_reso=128, max_bucket_reso=1024, enable_bucket=True, steps=50, save_every=10, sample_every=0,
    sample_prompt="", shuffle_caption=True, tag_dropout=0.2, clip_skip=1, seed=3, resume=True,
)


def build_forms(studio):
    with gr.Blocks() as blocks, gr.Tab("Train"):
        forms = build_train_tab(studio)
    return blocks, forms


def browser_data(form, typed: dict[str, object]) -> dict:
    """What a click sends: every input of ``form`` at its initial value, except what was ``typed`` (by
    elem_id, without the tab's prefix)."""
    data = {}
    for component in form.inputs():
        key = component.elem_id.removeprefix(f"{form.tab_id}_")
        data[component] = typed.get(key, component.value)
    return data


def test_the_tab_builds(studio):
    blocks, forms = build_forms(studio)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for elem_id in ("train_lora_name", "train_lora_data_dir", "train_lora_start", "train_lora_preview",
                    "train_lora_gallery", "train_lora_progress", "train_lora_loss", "train_lora_result",
                    "train_lora_interrupt", "train_create_embedding_name", "train_create_embedding_button",
                    "train_create_embedding_result", "train_create_hn_name", "train_create_hn_button",
                    "train_create_hn_result", "train_embedding_select", "train_embedding_start",
                    "train_hypernetwork_select", "train_hypernetwork_start", "train_ti_loss", "train_ti_interrupt"):
        assert elem_id in ids, elem_id
    # every field of the LoRA schema is set by a control (the hand-made ones, then "More parameters")
    hidden = {"checkpoint"}   # the UI trains on the checkpoint chosen at the top
    assert set(forms["lora"].schema.model_fields) - hidden <= forms["lora"].bound
    assert "train_lora_template" in ids and "train_lora_more_parameters" in ids
    # the embedding form reaches what A1111's tab has no control for
    assert {"train_ti_optimizer", "train_ti_mixed_precision", "train_ti_caption_extension"} <= ids
    assert set(forms["ti"].schema.model_fields) - hidden - {"learning_rate", "lr_scheduler", "lr_warmup_steps",
                                                            "overwrite"} <= forms["ti"].bound


def test_lora_values_map_to_the_request(studio, dataset):
    req = lora_request_from_values(studio, {**LORA_VALUES, "train_data_dir": str(dataset)})
    assert req.kind == "lora" and req.lora is req.settings   # one object: the run's and the LoRA's settings
    lora_fields = set(LoraSettings.model_fields)
    assert req.lora.model_dump(include=lora_fields) == LoraSettings(
        rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.5, train_unet=True, train_text_encoder=True, unet_lr=2e-4,
        text_encoder_lr=None, dropout=0.1).model_dump()
    assert req.settings.model_dump(exclude=lora_fields) == TrainSettings(
        train_data_dir=str(dataset), output_name="my_lora", steps=100, batch_size=2, gradient_accumulation=3,
        learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=5, optimizer="AdamW8bit",
        mixed_precision="bf16", resolution=640, enable_bucket=False, min_bucket_reso=128, max_bucket_reso=768,
        caption_extension=".caption", shuffle_caption=True, keep_tokens=1, caption_dropout=0.05, tag_dropout=0.1,
        noise_offset=0.03, min_snr_gamma=5.0, clip_skip=2, max_grad_norm=0.5, seed=42, save_every=25,
        sample_every=50, sample_prompt="a cat", sample_steps=12, overwrite=True, resume=False).model_dump()


def test_the_lora_form_turns_controls_into_fields(studio, dataset):
    _, forms = build_forms(studio)
    form = forms["lora"]
    values = form.values(browser_data(form, {"name": " my_lora ", "data_dir": f'"{dataset}"', "unet_lr": " ",
                                             "te_lr": "5e-5", "caption_extension": "", "rank": 4}))
    assert values["output_name"] == "my_lora" and values["train_data_dir"] == str(dataset)
    assert values["unet_lr"] is None and values["text_encoder_lr"] == "5e-5"
    assert values["caption_extension"] == ".txt" and values["rank"] == 4
    assert values["steps"] == 1000   # the schema's default in the control, not generation's 20
    req = lora_request_from_values(studio, values)
    assert req.lora.text_encoder_lr == 5e-5 and req.settings.template is None
    # a relative folder is found in the studio's data folder
    (Path(studio.paths.data) / "my_images").mkdir(exist_ok=True)
    relative = form.values(browser_data(form, {"name": "x", "data_dir": "my_images"}))
    assert relative["train_data_dir"] == str(Path(studio.paths.data) / "my_images")


def test_ti_values_map_to_the_request(studio):
    emb = ti_request_from_values(studio, "embedding", TI_VALUES)
    assert emb.kind == "embedding" and emb.learn_rate == "0.005:100, 1e-5" and emb.lora is None
    s = emb.settings
    assert s.output_name == "emb_a" and s.steps == 50 and s.batch_size == 2 and s.resolution == 128
    assert s.template == "style_filewords"   # a built-in template by name (the dataset reads it)
    assert s.min_bucket_reso == 128 and s.max_bucket_reso == 1024 and s.enable_bucket
    assert s.shuffle_caption and s.tag_dropout == 0.2 and s.save_every == 10 and s.seed == 3 and s.resume
    hn = ti_request_from_values(studio, "hypernetwork", TI_VALUES)
    assert hn.kind == "hypernetwork" and hn.settings.output_name == "hn_a" and hn.learn_rate == "0.00001"


def test_the_ti_form_turns_controls_into_fields(studio):
    _, forms = build_forms(studio)
    form = forms["ti"]
    data = browser_data(form, {"resolution": 128, "template": "style_filewords", "steps": 50})
    data.update({c: value for c in form.inputs() for elem_id, value in (("train_embedding_select", "emb_a"),
                 ("train_hypernetwork_select", "hn_a")) if c.elem_id == elem_id})
    values = form.values(data)
    # one size as in A1111's tab: the buckets around it; the template's lines
    assert (values["resolution"], values["min_bucket_reso"], values["max_bucket_reso"]) == (128, 128, 1024)
    assert values["template"] == "\n".join(DEFAULT_TEMPLATES["style_filewords"])
    emb = ti_request_from_values(studio, "embedding", values)
    hn = ti_request_from_values(studio, "hypernetwork", values)
    assert (emb.settings.output_name, emb.learn_rate) == ("emb_a", "0.005")   # the tab's own default rates
    assert (hn.settings.output_name, hn.learn_rate) == ("hn_a", "0.00001")
    assert emb.settings.optimizer == "AdamW" and emb.settings.steps == 50


def run_stream(studio, submit) -> list[tuple]:
    return list(stream_training(studio, submit, poll=0.05))


@pytest.mark.parametrize("changes, message", [   # pydantic's words, as the API's 422 and the CLI say them
    (dict(rank="four"), "rank: Input should be a valid integer, unable to parse string as an integer"),
    (dict(rank=2.5), "rank: Input should be a valid integer, got a number with a fractional part"),
    (dict(learning_rate=""), "learning_rate: Input should be a valid number, unable to parse string as a number"),
    (dict(unet_lr="fast"), "unet_lr: Input should be a valid number, unable to parse string as a number"),
    (dict(steps=None), "steps: Input should be a valid integer"),
    (dict(train_unet=False, train_text_encoder=False), "the UNet, the text encoder, or both"),
])
def test_bad_lora_values_are_said_and_nothing_is_queued(studio, changes, message):
    def submit():
        return studio.submit_training(lora_request_from_values(studio, {**LORA_VALUES, **changes}))

    updates = run_stream(studio, submit)
    assert len(updates) == 1
    assert updates[0][3].startswith("**Error:**") and message in updates[0][3]
    assert studio.queue.job_count == 0


def test_the_engine_refuses_what_the_form_cannot_know(studio, dataset, tmp_path):
    # checked by the engine before queueing: a missing folder, a bad name, values out of range
    for changes, message in ((dict(train_data_dir=str(tmp_path / "nope")), "does not exist"),
                             (dict(train_data_dir=str(dataset), output_name="a/b"), "not a valid file name"),
                             (dict(train_data_dir=str(dataset), lr_scheduler="sometimes"),
                              "lr_scheduler: Input should be 'constant'")):
        updates = run_stream(studio, lambda c=changes: studio.submit_training(
            lora_request_from_values(studio, {**LORA_VALUES, **c})))
        assert message in updates[-1][3], updates
    updates = run_stream(studio, lambda: studio.submit_training(
        ti_request_from_values(studio, "embedding", {**TI_VALUES, "embedding": None})))
    assert "choose the embedding to train" in updates[0][3]
    updates = run_stream(studio, lambda: studio.submit_training(
        ti_request_from_values(studio, "hypernetwork", {**TI_VALUES, "hypernetwork_lr": " "})))
    assert "give the hypernetwork learning rate" in updates[0][3]
    assert studio.queue.job_count == 0


def test_loss_plot_value():
    df = loss_plot_value([(1, 0.5), (2, 0.25), (3, float("nan")), (4, 0.125)])
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["step", "loss"]
    assert df["step"].tolist() == [1, 2, 4] and df["loss"].tolist() == [0.5, 0.25, 0.125]
    assert loss_plot_value([0.3, 0.2])["step"].tolist() == [1, 2]
    assert loss_plot_value([]).empty and list(loss_plot_value([]).columns) == ["step", "loss"]
    long = loss_plot_value([(i, 1.0 / i) for i in range(1, 5001)], max_points=100)
    assert len(long) <= 101 and long["step"].iloc[0] == 1 and long["step"].iloc[-1] == 5000
    # the plot component takes it
    plot = gr.LinePlot(x="step", y="loss")
    assert plot.postprocess(df).data == [[1, 0.5], [2, 0.25], [4, 0.125]]


def test_dataset_preview(studio, dataset, tmp_path):
    items, text = preview_dataset(studio, str(dataset), 96, True, 64, 128, ".txt")
    captions = sorted(caption for _, caption in items)
    assert len(items) == 4 and all(isinstance(img, Image.Image) and max(img.size) <= 256 for img, _ in items)
    assert "64x64 · a red square" in captions and "64x64 ×3 · grey" in captions
    assert any(c.startswith("128x64") and c.endswith("a green band") for c in captions)
    assert "64x64 · a blue tile (from the file name)" in captions
    assert text.startswith("4 images (1 in <repeats>_<name> folders); 6 steps per epoch")
    assert "2 buckets: 64x64 (3), 128x64 (1)" in text
    assert "1 image had no caption file" in text
    items, text = preview_dataset(studio, str(dataset), 64, False, 64, 128, ".txt")
    assert len(items) == 4 and "no bucketing: every image is cropped to 64x64" in text
    for folder, message in ((tmp_path / "missing", "does not exist"), ("", "choose the folder"),
                            (tmp_path, "no images in")):
        items, text = preview_dataset(studio, str(folder) if folder else "", 64, True, 64, 128, ".txt")
        assert items == [] and text.startswith("**Error:**") and message in text
    assert "resolution: Input should be a valid integer" in preview_dataset(studio, str(dataset), "big")[1]


def test_stream_shows_progress_losses_sample_and_summary(studio, tmp_path):
    go = threading.Event()
    sample = Image.new("RGB", (8, 8), (255, 0, 0))
    output = tmp_path / "x.safetensors"

    def fake_training(state):
        state.textinfo = "Training lora x"
        state.set_total(3)
        go.wait(5)
        for step, loss in ((1, 0.9), (2, 0.6), (3, 0.3)):
            state.losses.append((step, loss))
            state.advance()
        state.preview, state.preview_id = sample, 1
        return TrainResult("lora", output, 3, losses=[0.9, 0.6, 0.3], saved=[output], notes=["a note"],
                           seconds=2.5)

    stream = stream_training(studio, lambda: studio.queue.submit(fake_training, "train lora x"), poll=0.05)
    first = next(stream)
    assert first[3] == "_Training…_" and first[1].empty
    while_running = next(stream)
    assert "Training lora x" in while_running[0]
    assert "Step 0/3" in while_running[0] or "Preparing" in while_running[0]
    go.set()
    rest = list(stream)
    progress, plot, image, result = rest[-1]
    assert progress == ""
    assert plot["loss"].tolist() == [0.9, 0.6, 0.3]
    assert image is sample
    assert f"Wrote `{output}`" in result and "loss 0.9000 → 0.3000" in result and "_a note._" in result
    assert result.startswith("**Done.**")


def test_progress_and_summary_texts():
    class State:
        step, total, textinfo, eta = 5, 20, "Training lora <x>", 75.0
        losses = [(5, 0.1234)]

    html = training_progress_html(State())
    assert "Step 5/20 · 25% · loss 0.1234 · ETA 1m 15s" in html and "width:25%" in html
    assert "Training lora &lt;x&gt;" in html
    result = TrainResult("lora", Path("/m/x.safetensors"), 0, interrupted=True)
    assert result_summary(result).startswith("**Interrupted.** Nothing was saved")
    resumed = TrainResult("embedding", Path("/e/x.pt"), 30, losses=[0.5, 0.4], saved=[Path("/e/x.pt")],
                          resumed_from=28, seconds=3725)
    text = result_summary(resumed)
    assert "Step 30 (2 this run, resumed from 28), loss 0.5000 → 0.4000, 1h 02m." in text


def test_interrupt_only_stops_training(studio):
    assert interrupt_training(studio) == "_No training is running._"
    started, flags = threading.Event(), []

    def job(state):
        started.set()
        for _ in range(200):
            if state.interrupted:
                break
            threading.Event().wait(0.01)
        flags.append(state.interrupted)

    j = studio.queue.submit(job, "train lora y")
    started.wait(5)
    assert "Interrupting" in interrupt_training(studio)
    j.wait(10)
    assert flags == [True]


def test_created_embedding_appears_in_the_dropdown(studio):
    message, update = create_embedding(studio, "uitrain_emb", "a photo", 2, False)
    assert message.startswith("Created embedding `uitrain_emb`"), message
    assert "uitrain_emb" in update["choices"] and update["value"] == "uitrain_emb"
    assert "uitrain_emb" in embedding_choices(studio)
    refreshed = refresh_embeddings(studio, "gone")
    assert "uitrain_emb" in refreshed["choices"] and refreshed["value"] == refreshed["choices"][0]
    # the same name again is refused unless overwrite
    message, update = create_embedding(studio, "uitrain_emb", "a photo", 2, False)
    assert message.startswith("**Error:**") and "already exists" in message and update == gr.update()
    assert create_embedding(studio, "uitrain_emb", "", 1, True)[0].startswith("Created")
    assert "vectors per token must be 1-75" in create_embedding(studio, "other", "*", 76, False)[0]
    with gr.Blocks(), gr.Tab("Train"):
        build_train_tab(studio)   # the tab lists it from the start too


def test_create_hypernetwork(studio):
    message, update = create_hypernetwork(studio, "uitrain_hn", ["768", "320"], "1, 2, 1", "relu", "XavierNormal",
                                          True, True, "0, 0.1, 0", False)
    assert message.startswith("Created hypernetwork `uitrain_hn`"), message
    assert "uitrain_hn" in update["choices"] and update["value"] == "uitrain_hn"
    assert Path(studio.paths.hypernetwork_dirs[0], "uitrain_hn.pt").is_file()
    assert "at least one module size" in create_hypernetwork(studio, "x", [], "1, 2, 1", "linear", "Normal",
                                                             False, False, "0, 0, 0", False)[0]
    bad = create_hypernetwork(studio, "x", ["768"], "1, 2, 1", "nonsense", "Normal", False, False, "0, 0, 0", False)
    assert bad[0].startswith("**Error:**") and "activation" in bad[0]


def test_thumbnails_are_small_and_upright(studio, tmp_path):
    big = np.zeros((600, 300, 3), np.uint8)
    Image.fromarray(big).save(tmp_path / "tall.png")
    items, text = preview_dataset(studio, str(tmp_path), 256, True, 64, 1024, ".txt")
    assert items[0][0].size == (128, 256)
