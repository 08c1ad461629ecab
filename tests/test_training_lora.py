"""LoRA training's trainable (studio.training.lora) on tiny models: attach / detach exactness, the
kohya file it saves (names, alphas, metadata, hashes), that the file merged by our loader gives the
outputs the peft adapters gave, and atomic saving.

Expected kohya names come from studio.testing.loras (written to kohya's spec independently of the
trainable) or are spelled out here by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from studio.config import Flags
from studio.core import Studio
from studio.devices import resolve_policy
from studio.generation.infotext import parse_infotext
from studio.generation.request import Txt2ImgRequest
from studio.models.catalog import CheckpointInfo, HashCache
from studio.models.loader import load_checkpoint
from studio.networks.lora import ActiveNetwork, LoraLibrary, NetworkPatcher, addnet_hash
from studio.testing.loras import kohya_names, unet_targets
from studio.training.base import TrainingError
from studio.training.lora import ADAPTER_NAME, LoraSettings, LoraTrainable, kohya_key_names
from tests.helpers import make_models_dir

KOHYA_KEY = re.compile(r"(lora_(?:unet|te|te1|te2)_[a-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-lora")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.root = root
    yield s
    s.queue.shutdown()


def load(studio: Studio, family: str):
    return studio.select_checkpoint(f"tiny-{family}.safetensors")


def generate(studio: Studio, prompt: str):
    req = Txt2ImgRequest(prompt=prompt, steps=2, width=64, height=64, seed=1, save_images=False,
                         sampler_name="Euler")
    return studio.txt2img(req)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


def components(model) -> dict:
    names = ["unet", "text_encoder", "text_encoder_2"]
    return dict(zip(names, [model.unet, *model.text_encoders]))


def snapshot(model) -> dict:
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()}
            for c, m in components(model).items()}


def assert_pristine(model, original: dict) -> None:
    for component, module in components(model).items():
        now = module.state_dict()
        assert list(now) == list(original[component]), component
        for key, value in now.items():
            assert torch.equal(value, original[component][key]), (component, key)


def unet_inputs(model, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    context, pooled = model.conditioner.encode_for_training(["a photo of a cat"], 1)
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=generator), "timestep": torch.tensor([500]),
              "encoder_hidden_states": context.detach()}
    if model.is_sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": pooled.detach(),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    return inputs


@torch.no_grad()
def unet_out(model, inputs) -> torch.Tensor:
    return model.unet(**inputs).sample.float()


def randomize(trainable: LoraTrainable, seed: int, parts=("lora_B",), scale: float = 0.05) -> None:
    """Simulate training: random factors, set through load_state_dict (the resume path)."""
    generator = torch.Generator().manual_seed(seed)
    state = trainable.state_dict()
    for key, value in state.items():
        if any(f".{p}." in key for p in parts):
            state[key] = torch.randn(value.shape, generator=generator) * scale
    trainable.load_state_dict(state)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def group_modules(tensors: dict) -> dict[str, dict]:
    modules: dict[str, dict] = {}
    for key, value in tensors.items():
        m = KOHYA_KEY.fullmatch(key)
        assert m, f"not a kohya LoRA key: {key}"
        modules.setdefault(m[1], {})[m[2]] = value
    return modules


# --------------------------------------------------------------------------- names


def test_kohya_key_names_sd1(studio):
    model = load(studio, "sd1")
    names = kohya_key_names(model)
    assert names["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert names["unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj"] == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj"
    assert names["unet.down_blocks.1.resnets.0.conv_shortcut"] == \
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    assert names["text_encoder.encoder.layers.1.self_attn.q_proj"] == \
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert names["text_encoder.encoder.layers.0.mlp.fc2"] == "lora_te_text_model_encoder_layers_0_mlp_fc2"

    # while adapters are attached the names are the same (no base_layer / lora_A entries)
    trainable = LoraTrainable(LoraSettings(rank=2, train_text_encoder=True, conv_rank=2), Path("x"), 1e-4)
    trainable.attach(model)
    try:
        assert kohya_key_names(model) == names
    finally:
        trainable.detach(model)


def test_kohya_key_names_sdxl_use_ldm_names(studio):
    model = load(studio, "sdxl")
    names = kohya_key_names(model)
    # tiny SDXL: two layers per block, cross-attention in the first level
    assert names["unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"] == \
        "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k"
    assert names["unet.down_blocks.0.attentions.0.proj_in"] == "lora_unet_input_blocks_1_1_proj_in"
    assert names["unet.down_blocks.1.resnets.0.conv1"] == "lora_unet_input_blocks_4_0_in_layers_2"
    assert names["unet.down_blocks.1.resnets.0.conv_shortcut"] == "lora_unet_input_blocks_4_0_skip_connection"
    assert names["unet.down_blocks.0.downsamplers.0.conv"] == "lora_unet_input_blocks_3_0_op"
    assert names["unet.mid_block.attentions.0.proj_out"] == "lora_unet_middle_block_1_proj_out"
    assert names["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"] == \
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_out_0"
    assert names["text_encoder.encoder.layers.0.self_attn.v_proj"] == \
        "lora_te1_text_model_encoder_layers_0_self_attn_v_proj"
    assert names["text_encoder_2.text_model.encoder.layers.1.mlp.fc1"] == \
        "lora_te2_text_model_encoder_layers_1_mlp_fc1"

    trainable = LoraTrainable(LoraSettings(rank=2, train_text_encoder=True, conv_rank=2), Path("x"), 1e-4)
    trainable.attach(model)
    try:
        assert kohya_key_names(model) == names
    finally:
        trainable.detach(model)


# --------------------------------------------------------------------------- attach / detach


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_attach_changes_nothing_until_trained_and_detach_restores_everything(studio):
    model = load(studio, "sd1")
    baseline = pixels(generate(studio, "a cat"))
    original = snapshot(model)
    # loaded models are frozen; make two parameters trainable to see that attach freezes them and
    # detach gives the flags back
    model.unet.conv_in.weight.requires_grad_(True)
    model.text_encoders[0].final_layer_norm.weight.requires_grad_(True)
    next(model.vae.parameters()).requires_grad_(True)
    flags = {id(p): p.requires_grad for m in (*components(model).values(), model.vae) for p in m.parameters()}
    inputs = unet_inputs(model)
    before = unet_out(model, inputs)
    context_before = model.conditioner.encode_for_training(["a cat"], 1)[0].detach()
    expected_unet = {name for name, _ in unet_targets(model.unet, conv=True)}

    settings = LoraSettings(rank=4, alpha=2.0, conv_rank=2, train_text_encoder=True, unet_lr=5e-4)
    trainable = LoraTrainable(settings, Path("unused.safetensors"), 1e-4)
    groups = trainable.attach(model)

    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 5e-4), ("text_encoder", 1e-4)]
    assert all(g["params"] for g in groups)
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable_params = {id(p): name for m in (*components(model).values(), model.vae)
                        for name, p in m.named_parameters() if p.requires_grad}
    assert set(trainable_params) == in_groups
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable_params.values())
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])
    wrapped = {name for name, m in model.unet.named_modules() if hasattr(m, "base_layer")}
    assert wrapped == expected_unet  # kohya's targets: transformer Linear/1x1 + (LoCon) resnet/sampler layers
    te_wrapped = {name for name, m in model.text_encoders[0].named_modules() if hasattr(m, "base_layer")}
    tails = {n.rsplit(".", 1)[-1] for n in te_wrapped}
    assert tails == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert len(te_wrapped) == 6 * model.text_encoders[0].config.num_hidden_layers

    # untrained (up = 0): the outputs are those of the checkpoint
    assert torch.equal(unet_out(model, inputs), before)
    context, pooled = trainable.encode(model, ["a cat"], 1)
    assert torch.equal(context.detach(), context_before) and pooled is None
    assert context.requires_grad  # the text encoder learns

    # one backward pass reaches the LoRA factors and nothing else
    model.unet(**{**inputs, "encoder_hidden_states": context}).sample.square().mean().backward()
    grads = {name: p.grad for m in components(model).values() for name, p in m.named_parameters()
             if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert any(".lora_B." in n and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder."))
    for g in groups:
        for p in g["params"]:
            p.grad = None

    # "trained": the studio's own generation (a training sample) sees the adapters, also for a
    # prompt whose encoding was cached before attach; and after detach no stale encoding is left
    randomize(trainable, seed=9)
    assert not np.array_equal(pixels(generate(studio, "a cat")), baseline)

    trainable.detach(model)
    assert_pristine(model, original)
    assert {id(p): p.requires_grad for m in (*components(model).values(), model.vae)
            for p in m.parameters()} == flags
    assert model.unet.conv_in.weight.requires_grad
    model.unet.conv_in.weight.requires_grad_(False)
    model.text_encoders[0].final_layer_norm.weight.requires_grad_(False)
    next(model.vae.parameters()).requires_grad_(False)
    assert not any(hasattr(m, "peft_config") for m in components(model).values())
    assert torch.equal(unet_out(model, inputs), before)
    np.testing.assert_array_equal(pixels(generate(studio, "a cat")), baseline)


def test_lora_params_stay_float32_on_a_bf16_model(studio, tmp_path):
    path = studio.root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
    policy = resolve_policy("cpu", precision="bf16")
    model = load_checkpoint(CheckpointInfo(path=path, name=path.name), policy, tmp_path / "configs")
    assert model.unet.dtype == torch.bfloat16
    original = snapshot(model)
    trainable = LoraTrainable(LoraSettings(rank=4, train_text_encoder=True), tmp_path / "x.safetensors", 1e-4)
    groups = trainable.attach(model)
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])
    randomize(trainable, seed=3)
    inputs = {k: (v.to(torch.bfloat16) if k != "timestep" else v) for k, v in unet_inputs(model).items()}
    out = model.unet(**inputs).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    trainable.detach(model)
    assert_pristine(model, original)


# --------------------------------------------------------------------------- the saved file


def test_saved_file_is_kohya_format_and_loads_through_the_studio(studio):
    model = load(studio, "sd1")
    original = snapshot(model)
    settings = LoraSettings(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True)
    path = studio.root / "models" / "Lora" / "trained.safetensors"
    trainable = LoraTrainable(settings, path, 1e-4)
    trainable.attach(model)
    randomize(trainable, seed=5)
    assert trainable.save(path, step=7, metadata={"ss_resolution": "(64, 64)", "ss_clip_skip": 1}) == path
    trainable.detach(model)

    tensors, metadata = read(path)
    modules = group_modules(tensors)
    expected = kohya_names(components(model), "sd1", conv=True, te=True)
    layers = dict(expected)
    assert set(modules) == set(layers)
    for name, parts in modules.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, name
        assert all(t.dtype == torch.float16 for t in parts.values()), name
        layer = layers[name]
        down, up, alpha = parts["lora_down.weight"], parts["lora_up.weight"], parts["alpha"]
        assert alpha.dim() == 0
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1):
            assert down.shape == (2, layer.in_channels, *layer.kernel_size) and alpha.item() == 1.0
            assert up.shape == (layer.out_channels, 2, 1, 1)
        elif isinstance(layer, torch.nn.Conv2d):
            assert down.shape == (4, layer.in_channels, 1, 1) and up.shape == (layer.out_channels, 4, 1, 1)
            assert alpha.item() == 2.0
        else:
            assert down.shape == (4, layer.in_features) and up.shape == (layer.out_features, 4)
            assert alpha.item() == 2.0
        assert up.abs().sum() > 0, name

    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 2.0
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_output_name"] == "trained" and metadata["ss_steps"] == "7"
    assert metadata["ss_training_comment"] == "trained with studio"
    assert metadata["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert metadata["ss_network_train_unet_only"] == "False"
    assert metadata["ss_network_train_text_encoder_only"] == "False"
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_clip_skip"] == "1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.title"] == "trained"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", metadata["modelspec.date"])
    # sd-scripts' precomputed hashes: the data section of a serialisation with only ss_* metadata
    assert metadata["sshs_model_hash"] == addnet_hash(path)
    blob = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]

    studio.networks.refresh()
    plain = pixels(generate(studio, "a cat"))
    result = generate(studio, "a cat <lora:trained:1>")
    assert not any("trained" in note for note in result.notes), result.notes  # no unmatched / skipped modules
    assert parse_infotext(result.infotexts[0])["Lora hashes"] == f"trained: {addnet_hash(path)[:12]}"
    off = generate(studio, "a cat <lora:trained:0>")
    assert not np.array_equal(pixels(result), pixels(off))
    np.testing.assert_array_equal(pixels(off), plain)
    # a text-encoder-only multiplier changes the image too: the te modules matched
    te_only = pixels(generate(studio, "a cat <lora:trained:1:0>"))
    assert not np.array_equal(te_only, plain)

    # the prompt's LoRA is still merged into the text encoder; training starts from the checkpoint
    again = LoraTrainable(LoraSettings(rank=1), path, 1e-4)
    again.attach(model)
    again.detach(model)
    assert_pristine(model, original)
    np.testing.assert_array_equal(pixels(generate(studio, "a cat <lora:trained:1:0>")), te_only)
    np.testing.assert_array_equal(pixels(generate(studio, "a cat")), plain)

    # a model first used with prompt LoRAs while adapters are attached (a training sample) works
    # normally again after detach
    model.lora_patcher = None
    again.attach(model)
    generate(studio, "a cat <lora:trained:1>")
    again.detach(model)
    assert_pristine(model, original)
    after = generate(studio, "a cat <lora:trained:1>")
    assert after.notes == result.notes
    np.testing.assert_array_equal(pixels(after), pixels(result))
    np.testing.assert_array_equal(pixels(generate(studio, "a cat")), plain)  # un-merges it for the next test


@pytest.mark.parametrize("family,settings", [
    ("sd1", LoraSettings(rank=4, alpha=2.0, conv_rank=3, conv_alpha=1.5, train_text_encoder=False)),
    ("sdxl", LoraSettings(rank=4, alpha=8.0, conv_rank=2, conv_alpha=1.0, train_text_encoder=True)),
])
def test_peft_outputs_equal_the_file_merged_by_our_loader(studio, tmp_path, family, settings):
    model = load(studio, family)
    original = snapshot(model)
    inputs = unet_inputs(model, seed=2)
    base = unet_out(model, inputs)
    captions = ["a photo of a cat", "a dog"]
    base_context, base_pooled = model.conditioner.encode_for_training(captions, 1)

    trainable = LoraTrainable(settings, tmp_path / "Lora" / "eq.safetensors", 1e-4)
    trainable.attach(model)
    randomize(trainable, seed=11, parts=("lora_A", "lora_B"), scale=0.1)
    trained = unet_out(model, inputs)
    context, pooled = (t.detach() if t is not None else None for t in trainable.encode(model, captions, 1))
    trainable.save(trainable.output_path, step=1, dtype=torch.float32)
    trainable.detach(model)
    assert_pristine(model, original)

    modules = group_modules(read(trainable.output_path)[0])
    expected = kohya_names(components(model), family, conv=True, te=settings.train_text_encoder)
    assert set(modules) == {name for name, _ in expected}  # SDXL: LDM names, lora_te1_ / lora_te2_

    library = LoraLibrary([tmp_path / "Lora"], HashCache(tmp_path / "cache.json"))
    library.refresh()
    patcher = NetworkPatcher(model.unet, model.text_encoders, model.family, model.is_sdxl)
    report = patcher.apply([ActiveNetwork(library.find("eq"), 1.0, 1.0)], library)
    try:
        assert report.applied == ["eq"] and report.warnings == []
        merged = unet_out(model, inputs)
        merged_context, merged_pooled = model.conditioner.encode_for_training(captions, 1)
    finally:
        patcher.restore()
    assert_pristine(model, original)

    error = (merged - trained).abs().max().item()
    assert error < 1e-4 * trained.abs().max().item(), error
    assert (trained - base).abs().max().item() > 100 * error  # the LoRA does something sizeable
    if settings.train_text_encoder:
        torch.testing.assert_close(merged_context.detach(), context, rtol=1e-4, atol=1e-4)
        assert (context - base_context.detach()).abs().max() > 1e-2
        if model.is_sdxl:
            torch.testing.assert_close(merged_pooled.detach(), pooled, rtol=1e-4, atol=1e-4)
            assert (pooled - base_pooled.detach()).abs().max() > 1e-2
    else:
        assert torch.equal(merged_context, base_context)


# --------------------------------------------------------------------------- atomic saves, errors, resume


@pytest.mark.parametrize("failing", ["save_file", "replace"])
def test_a_failed_save_leaves_the_previous_file_intact(studio, tmp_path, monkeypatch, failing):
    model = load(studio, "sd1")
    folder = tmp_path / "Lora"
    path = folder / "atomic.safetensors"
    trainable = LoraTrainable(LoraSettings(rank=2), path, 1e-4)
    trainable.attach(model)
    try:
        randomize(trainable, seed=1)
        trainable.save(path, step=1, metadata={})
        good = path.read_bytes()
        randomize(trainable, seed=2)

        real_save_file = safetensors.torch.save_file

        def broken_save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:   # half-written
                f.truncate(100)
            raise OSError("disk full")

        def broken_replace(src, dst):
            raise OSError("cross-device link")

        if failing == "save_file":
            monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
        else:
            monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError):
            trainable.save(path, step=2, metadata={})
        monkeypatch.undo()
        assert path.read_bytes() == good
        assert sorted(p.name for p in folder.iterdir()) == ["atomic.safetensors"]

        trainable.save(path, step=3, metadata={})  # and a good save replaces it
        assert read(path)[1]["ss_steps"] == "3" and path.read_bytes() != good
        assert sorted(p.name for p in folder.iterdir()) == ["atomic.safetensors"]
    finally:
        trainable.detach(model)


def test_settings_errors_and_resume(studio, tmp_path):
    # the settings are a schema: a bad value is refused where it is made, naming the field
    with pytest.raises(ValidationError, match="rank"):
        LoraSettings(rank=0)
    with pytest.raises(ValidationError, match="a LoRA must train the UNet, the text encoder, or both"):
        LoraSettings(train_unet=False)   # the default train_text_encoder=False is checked too
    with pytest.raises(ValidationError, match="dropout"):
        LoraSettings(dropout=1.0)
    with pytest.raises(ValidationError, match="finite"):
        LoraSettings(unet_lr=float("nan"))
    assert LoraSettings(rank=4, alpha=0).effective_alpha == 4.0   # kohya: alpha 0 means rank

    model = load(studio, "sd1")
    original = snapshot(model)
    first = LoraTrainable(LoraSettings(rank=2, train_text_encoder=True), tmp_path / "r.safetensors", 1e-4)
    first.attach(model)
    with pytest.raises(TrainingError):
        first.attach(model)
    randomize(first, seed=4, parts=("lora_A", "lora_B"))
    state = first.state_dict()
    first.detach(model)
    assert_pristine(model, original)

    # resume: a fresh trainable with the same settings takes the state back exactly
    second = LoraTrainable(LoraSettings(rank=2, train_text_encoder=True), tmp_path / "r.safetensors", 1e-4)
    second.attach(model)
    try:
        second.load_state_dict(state)
        again = second.state_dict()
        assert list(again) == list(state) and all(torch.equal(again[k], state[k]) for k in state)
        assert all(k.startswith(("unet.", "text_encoder.")) and ADAPTER_NAME not in k for k in state)
        with pytest.raises(TrainingError):
            second.load_state_dict({k: v for k, v in state.items() if not k.startswith("text_encoder.")})
        wrong = dict(state)
        key = next(iter(wrong))
        wrong[key] = torch.zeros(1)
        with pytest.raises(TrainingError):
            second.load_state_dict(wrong)
    finally:
        second.detach(model)
    assert_pristine(model, original)
