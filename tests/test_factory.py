"""The tiny-model factory: real tokenizer ids, and exact round trips of every family
through diffusers' own single-file converters and ``from_pretrained``."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from studio.models.tokenizer import clip_vocab_and_merges, make_clip_tokenizer, write_tokenizer_files
from studio.testing import (
    FAMILIES,
    heads_for,
    make_checkpoint,
    make_diffusers_folder,
    make_vae,
    pipeline_class,
    te_heads,
    tiny_components,
    to_ldm_state_dict,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
UNET = "model.diffusion_model."


# --------------------------------------------------------------------------- tokenizer


def test_vocab_sizes():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0


def test_tokenizer_ids():
    tok = make_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok(",").input_ids == [49406, 267, 49407]
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    padded = make_clip_tokenizer(pad_token="!")("a photo of a cat", padding="max_length").input_ids
    assert len(padded) == 77 and padded[:7] == CAT_IDS and padded[7:] == [0] * 70


def test_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    text = "A masterpiece, (best quality:1.2), 1girl, looking_at_viewer!! naïve café 東京 🙂 don't"
    ours = make_clip_tokenizer()(text, add_special_tokens=False).input_ids
    assert ours == SimpleTokenizer().encode(text)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_files(tmp_path, pad):
    write_tokenizer_files(tmp_path, pad_token=pad)
    assert {p.name for p in tmp_path.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    tok = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert tok.pad_token == pad and tok.model_max_length == 77


# --------------------------------------------------------------------------- conventions


def test_head_conventions():
    assert heads_for("sd1", 320) == 8 and heads_for("sd1-inpaint", 32) == 8
    assert [heads_for("sd2-v", c) for c in (320, 640, 1280)] == [5, 10, 20]
    assert [heads_for("sdxl", c) for c in (32, 64, 128)] == [1, 1, 2]
    assert [te_heads(h) for h in (32, 768, 1024, 1280)] == [1, 12, 16, 20]


def test_components_leave_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny_components("sd1", seed=9)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- per family


@dataclass
class Built:
    family: str
    components: dict[str, Any]
    folder: Path
    files: dict[str, Path]  # suffix -> single-file checkpoint


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> Built:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    components = tiny_components(family, seed=0)
    folder = make_diffusers_folder(root / "diffusers", family, components=components)
    files = {s: make_checkpoint(root / f"model{s}", family, components=components)
             for s in (".safetensors", ".ckpt")}
    return Built(family, components, folder, files)


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, what: str) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys(), f"{what}: keys differ: {sorted(set(want) ^ set(got))[:5]}"
    different = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


def model_names(components: dict[str, Any]) -> list[str]:
    return [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in components]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_round_trip(built, suffix):
    pipe = pipeline_class(built.family).from_single_file(
        str(built.files[suffix]), config=str(built.folder), local_files_only=True)
    for name in model_names(built.components):
        assert_same_weights(built.components[name], getattr(pipe, name), f"{built.family} {suffix} {name}")
    assert pipe.scheduler.config.prediction_type == built.components["prediction_type"]
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_model_level_round_trip(built):
    unet = UNet2DConditionModel.from_single_file(
        str(built.files[".ckpt"]), config=str(built.folder), subfolder="unet", local_files_only=True)
    assert_same_weights(built.components["unet"], unet, f"{built.family} unet")


def test_from_pretrained(built):
    pipe = pipeline_class(built.family).from_pretrained(built.folder, local_files_only=True)
    for name in model_names(built.components):
        assert_same_weights(built.components[name], getattr(pipe, name), f"{built.family} {name}")
    expected_pads = [(pipe.tokenizer, "!" if built.family.startswith("sd2") else "<|endoftext|>")]
    if hasattr(pipe, "tokenizer_2"):
        expected_pads.append((pipe.tokenizer_2, "!"))
    for tok, pad in expected_pads:
        assert tok("a photo of a cat").input_ids == CAT_IDS and tok.pad_token == pad


def test_ckpt_is_weights_only_and_matches_safetensors(built):
    ckpt = torch.load(built.files[".ckpt"], weights_only=True)
    assert set(ckpt) == {"state_dict", "global_step"}
    flat = load_file(built.files[".safetensors"])
    assert ckpt["state_dict"].keys() == flat.keys()
    assert all(torch.equal(flat[k], v) for k, v in ckpt["state_dict"].items())


def test_ldm_layout(built):
    family, sd = built.family, load_file(built.files[".safetensors"])
    assert sd[UNET + "input_blocks.0.0.weight"].shape[1] == (9 if family.endswith("inpaint") else 4)
    assert ("v_pred" in sd) == (family == "sd2-v")
    proj_in = sd[UNET + "input_blocks.1.1.proj_in.weight"]
    assert proj_in.ndim == (4 if family.startswith("sd1") else 2)
    assert (UNET + "label_emb.0.0.weight" in sd) == family.startswith("sdxl")
    # The upsampler of a level without attention sits in slot 1 of its last block.
    assert UNET + "output_blocks.2.1.conv.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in sd
    if family.startswith("sd1"):
        assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    elif family.startswith("sd2"):
        # Real SD2 files carry one more resblock than the HF model uses.
        resblocks = "cond_stage_model.model.transformer.resblocks."
        blocks = {k[len(resblocks):].split(".")[0] for k in sd if k.startswith(resblocks)}
        assert len(blocks) == built.components["text_encoder"].config.num_hidden_layers + 1
        assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    else:
        te2 = built.components["text_encoder_2"]
        assert torch.equal(sd["conditioner.embedders.1.model.text_projection"], te2.text_projection.weight.T)
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd


def test_standalone_vae(built, tmp_path):
    if built.family not in ("sd1", "sdxl"):
        pytest.skip("same VAE layout as its base family")
    for suffix in (".safetensors", ".pt"):
        path = make_vae(tmp_path / f"tiny.vae{suffix}", built.family, components=built.components)
        vae = AutoencoderKL.from_single_file(
            str(path), config=str(built.folder), subfolder="vae", local_files_only=True)
        assert_same_weights(built.components["vae"], vae, f"{built.family} standalone vae{suffix}")
    keys = load_file(tmp_path / "tiny.vae.safetensors").keys()
    assert {"model_ema.decay", "model_ema.num_updates", "loss.logvar", "encoder.conv_in.weight"} <= keys


def test_tiny_eps_reads_as_eps(built):
    """A1111's v-prediction probe must not mistake a tiny (untrained) model for v."""
    unet = built.components["unet"]
    if unet.config.addition_embed_type is not None:
        pytest.skip("the probe is only run on SD2-class models")
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    ctx = torch.full((1, 77, unet.config.cross_attention_dim), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), ctx).sample
    assert (out - x[:, :4]).mean() > -1


# --------------------------------------------------------------------------- files


def test_same_seed_same_bytes(tmp_path):
    def digests(name: str, seed: int) -> list[str]:
        components = tiny_components("sd1", seed=seed)
        # torch.save names its zip folder after the file stem, so the stem is kept.
        paths = [make_checkpoint(tmp_path / name / f"m{s}", "sd1", components=components)
                 for s in (".safetensors", ".ckpt")]
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    first, again, other = digests("a", 3), digests("b", 3), digests("c", 4)
    assert first == again
    assert all(x != y for x, y in zip(first, other))


def test_dtype_and_bad_suffix(tmp_path):
    components = tiny_components("sd1")
    half = make_checkpoint(tmp_path / "half.safetensors", "sd1", dtype=torch.float16, components=components)
    sd = load_file(half)
    assert sd[UNET + "out.2.weight"].dtype == torch.float16
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert to_ldm_state_dict(components, "sd1").keys() == sd.keys()
    with pytest.raises(ValueError):
        make_checkpoint(tmp_path / "model.bin", "sd1", components=components)
