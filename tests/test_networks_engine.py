"""LoRA, hypernetwork and VAE choices through the whole engine: prompt tags -> merged weights
or hooks -> image and infotext, and back to the exact baseline when they are removed."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.testing import make_checkpoint, make_vae, tiny_components
from studio.testing.hypernetworks import tiny_widths, write_hypernetwork
from studio.testing.loras import write_kohya_lora


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("networks")
    models = root / "models"
    sd1 = tiny_components("sd1", seed=1)
    make_checkpoint(models / "Stable-diffusion" / "tiny-sd1.safetensors", "sd1", components=sd1)
    write_kohya_lora(models / "Lora" / "style.safetensors", sd1, "sd1", rank=4, alpha=2.0, seed=3,
                     output_name="styleAlias")
    write_kohya_lora(models / "Lora" / "sub" / "other.safetensors", sd1, "sd1", rank=2, alpha=1.0, seed=4)
    write_kohya_lora(models / "Lora" / "xl-only.safetensors", tiny_components("sdxl", seed=1), "sdxl", seed=5)
    write_hypernetwork(models / "hypernetworks" / "hn.pt", widths=tiny_widths("sd1"), seed=6)
    make_vae(models / "VAE" / "other-vae.safetensors", "sd1", seed=7)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def run(studio: Studio, prompt: str, **kw):
    req = Txt2ImgRequest(prompt=prompt, steps=2, width=64, height=64, seed=11, sampler_name="Euler",
                         save_images=False, **kw)
    return studio.txt2img(req)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


@pytest.fixture(scope="module")
def baseline(studio):
    return pixels(run(studio, "a red cube"))


def addnet_hash(path) -> str:
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header:]).hexdigest()


def test_lora_changes_the_image_and_removal_restores_it_exactly(studio, baseline):
    result = run(studio, "a red cube <lora:style:1>")
    assert not np.array_equal(pixels(result), baseline)
    params = parse_infotext(result.infotexts[0])
    lora_file = studio.paths.lora_dirs[0] / "style.safetensors"
    assert params["Lora hashes"] == f"styleAlias: {addnet_hash(lora_file)[:12]}"
    assert "<lora:style:1>" in params["Prompt"]
    np.testing.assert_array_equal(pixels(run(studio, "a red cube")), baseline)


def test_lora_at_weight_zero_and_alias_lookup(studio, baseline):
    np.testing.assert_array_equal(pixels(run(studio, "a red cube <lora:style:0>")), baseline)
    by_alias = pixels(run(studio, "a red cube <lora:styleAlias:1>"))
    by_name = pixels(run(studio, "a red cube <lora:style:1>"))
    np.testing.assert_array_equal(by_alias, by_name)


def test_text_encoder_only_lora_is_not_hidden_by_the_prompt_cache(studio, baseline):
    # te=1, unet=0: only the text encoder changes, so a stale cached conditioning would
    # give the baseline image back
    te_only = pixels(run(studio, "<lora:style:1:0>a red cube"))  # same text as the baseline once stripped
    assert not np.array_equal(te_only, baseline)
    np.testing.assert_array_equal(pixels(run(studio, "a red cube")), baseline)


def test_two_loras_in_either_order_give_the_same_image(studio):
    ab = pixels(run(studio, "a red cube <lora:style:0.7> <lora:other:0.5>"))
    ba = pixels(run(studio, "a red cube <lora:other:0.5> <lora:style:0.7>"))
    np.testing.assert_array_equal(ab, ba)


def test_wrong_family_and_missing_loras_are_skipped_with_notes(studio, baseline):
    result = run(studio, "a red cube <lora:xl-only:1> <lora:nope:1>")
    np.testing.assert_array_equal(pixels(result), baseline)
    notes = " ".join(result.notes)
    assert "xl-only" in notes and "nope" in notes
    assert "Lora hashes" not in parse_infotext(result.infotexts[0])


def test_hypernetwork_strength_zero_is_exact_and_hooks_are_removed(studio, baseline):
    np.testing.assert_array_equal(pixels(run(studio, "a red cube <hypernet:hn:0>")), baseline)
    changed = pixels(run(studio, "a red cube <hypernet:hn:1>"))
    assert not np.array_equal(changed, baseline)
    unet = studio.models.current.unet
    assert all(not m._forward_pre_hooks for m in unet.modules())
    np.testing.assert_array_equal(pixels(run(studio, "a red cube")), baseline)


def test_external_vae_is_used_recorded_and_undone(studio, baseline):
    result = run(studio, "a red cube", vae="other-vae.safetensors")
    assert not np.array_equal(pixels(result), baseline)
    params = parse_infotext(result.infotexts[0])
    assert params["VAE"] == "other-vae.safetensors"
    assert len(params["VAE hash"]) == 10
    assert result.info()["sd_vae_name"] == "other-vae.safetensors"
    # the default setting (Automatic) finds no VAE named like the checkpoint: the baked one
    np.testing.assert_array_equal(pixels(run(studio, "a red cube")), baseline)
    with pytest.raises(RequestError, match="not found|Available|available"):
        run(studio, "a red cube", vae="missing.safetensors")


def test_cards_list_every_kind(studio):
    names = {kind: [c.name for c in studio.network_cards(kind)]
             for kind in ("checkpoints", "lora", "hypernetworks", "textual_inversion")}
    assert names["checkpoints"] == ["tiny-sd1"]
    assert sorted(names["lora"]) == ["other", "style", "xl-only"]
    assert names["hypernetworks"] == ["hn"]
    lora = {c.name: c for c in studio.network_cards("lora")}
    assert lora["style"].insert == "<lora:style:1>"
    assert lora["xl-only"].family == "sdxl" and lora["style"].family == "sd1"


def test_vae_nan_decode_is_retried_in_float32(caplog):
    """A half-precision VAE that overflows to NaN (SDXL's VAE in fp16 does) is retried in
    float32 for that decode, logged, and stays float32 afterwards."""
    import logging
    from types import SimpleNamespace

    import torch

    from studio.generation.txt2img import decode_latents

    vae = tiny_components("sd1", seed=1)["vae"].to(torch.bfloat16)
    real_decode = vae.decode

    def overflowing(x, *a, **kw):
        out = real_decode(x, *a, **kw)
        if vae.dtype != torch.float32:
            out.sample.fill_(float("nan"))
        return out

    vae.decode = overflowing
    from studio.models.latent_codec import ScaleShiftCodec

    model = SimpleNamespace(vae=vae, policy=SimpleNamespace(device=torch.device("cpu")), latent_codec=ScaleShiftCodec(vae),
                            spec=SimpleNamespace(latent=SimpleNamespace(downscale=8)))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        [image] = decode_latents(model, latents)
    assert vae.dtype == torch.float32
    assert "retrying" in caplog.text and "float32" in caplog.text
    arr = np.asarray(image)
    assert arr.shape == (64, 64, 3) and arr.std() > 0
