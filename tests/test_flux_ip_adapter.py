"""XLabs' FLUX.1 IP-Adapter: the file layout, the loop against diffusers' FluxPipeline with the same
file loaded by its own ``load_ip_adapter``, weight / CFG rows, the transformer restored after a pass."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image
from transformers import CLIPImageProcessor

from studio.controlnet.clip_vision import ClipVisionEncoders, load_clip_vision
from studio.controlnet.flux_ip_adapter import (
    FluxIPAdapterGuidance,
    FluxIPAdapterUnit,
    is_flux_ip_adapter,
    load_flux_ip_adapter,
    to_diffusers_layout,
)
from studio.controlnet.ip_adapter import IP_ADAPTER
from studio.errors import RequestError
from studio.generation.dit_denoisers import pack_latents
from studio.generation.noise import make_noise
from studio.models.state_dict import ModelFileError, load_state_dict, read_shapes
from studio.testing.dit_parts import T5_HIDDEN, clip_l_config
from studio.testing.flux import FLUX_DOUBLE_BLOCKS, tiny_flux_components
from studio.testing.flux_adapters import write_flux_ip_adapter
from studio.testing.ip_adapters import write_clip_vision
from tests.helpers import flux_checkpoint, flux_latents

# the modules' own checks against diffusers (as test_flux_controlnet.py); the engine-level tests of the same
# models (tests/test_flux_adapters_engine.py) run in the main command
pytestmark = pytest.mark.slow

SIZE = 64
SEED = 7
GUIDANCE = 3.5
TOKENS = 8
CLIP_PROJ = 24


def reference() -> Image.Image:
    arr = np.zeros((40, 48, 3), np.uint8)
    arr[5:25, 8:30] = (240, 200, 20)
    arr[25:, :] = (30, 30, 200)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-ipa")
    parts = tiny_flux_components("dev", seed=0)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, TOKENS, T5_HIDDEN, generator=g)
    pooled = torch.randn(2, clip_l_config().hidden_size, generator=g)
    encoder = write_clip_vision(root / "clip_vision" / "clip_vision_l.safetensors", proj=CLIP_PROJ, seed=2)
    adapter = write_flux_ip_adapter(root / "xlabs" / "ip_adapter.safetensors", clip_dim=CLIP_PROJ, seed=3)
    return SimpleNamespace(**parts, embeds=embeds, pooled=pooled, encoder=encoder, adapter=adapter,
                           encoders=ClipVisionEncoders([root / "clip_vision"]),
                           weights=load_flux_ip_adapter(adapter))


def run(parts, units: list[FluxIPAdapterUnit], cfg: float = 1.0) -> torch.Tensor:
    callbacks = [FluxIPAdapterGuidance(units, parts.encoders)] if units else ()
    return flux_latents(parts, callbacks, cfg, 3, SIZE, SEED, GUIDANCE)


def unit(parts, **fields) -> FluxIPAdapterUnit:
    return FluxIPAdapterUnit(parts.weights, [reference()], **fields)


def test_the_xlabs_layout_is_recognised_and_renamed_as_diffusers_does(parts):
    shapes = read_shapes(parts.adapter)
    assert is_flux_ip_adapter(shapes)
    assert not is_flux_ip_adapter({"image_proj.proj.weight": (1,), "ip_adapter.1.to_k_ip.weight": (1,)})
    nested = to_diffusers_layout(load_state_dict(parts.adapter))
    assert set(nested["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert "1.to_v_ip.bias" in nested["ip_adapter"]
    w = parts.weights
    assert (w.image_embed_dim, w.width, w.blocks) == (CLIP_PROJ, T5_HIDDEN, FLUX_DOUBLE_BLOCKS)
    assert (w.probe.family, w.probe.kind) == ("flux1", IP_ADAPTER)
    with pytest.raises(ModelFileError, match="not an XLabs FLUX IP-Adapter"):
        to_diffusers_layout({"ip_adapter_proj_model.norm.weight": torch.zeros(2)})


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_loop_matches_diffusers_flux_pipeline_with_the_same_file(parts, cfg):
    got = run(parts, [unit(parts, weight=0.8)], cfg=cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    encoder = load_clip_vision(parts.encoder)
    pipe = FluxPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(parts.transformer), image_encoder=encoder,
                        feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
    pipe.load_ip_adapter(str(parts.adapter.parent), weight_name=parts.adapter.name,
                         image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)
    noise, _ = make_noise([SEED], (16, SIZE // 8, SIZE // 8))
    extra = {}
    if cfg != 1.0:   # diffusers' "true CFG": the negative half sees a black image, as the studio's
        extra = dict(true_cfg_scale=cfg, negative_prompt_embeds=parts.embeds[:1],
                     negative_pooled_prompt_embeds=parts.pooled[:1])
    with torch.no_grad():
        want = pipe(prompt_embeds=parts.embeds[1:], pooled_prompt_embeds=parts.pooled[1:], ip_adapter_image=reference(),
                    height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=GUIDANCE,
                    latents=pack_latents(noise), output_type="latent", **extra).images
    torch.testing.assert_close(pack_latents(got), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, run(parts, [], cfg=cfg), atol=1e-3)


def test_weight_zero_is_no_unit_and_the_transformer_is_restored(parts):
    before = {name: type(p) for name, p in parts.transformer.attn_processors.items()}
    plain = run(parts, [])
    assert torch.equal(run(parts, [unit(parts, weight=0.0)]), plain)
    assert not torch.allclose(run(parts, [unit(parts, guidance_end=0.3)]), run(parts, [unit(parts)]), atol=1e-4)
    assert {name: type(p) for name, p in parts.transformer.attn_processors.items()} == before
    assert not hasattr(parts.transformer, "encoder_hid_proj")
    assert torch.equal(run(parts, []), plain)


def test_an_adapter_for_another_transformer_or_without_encoder_is_refused(parts, tmp_path):
    other = load_flux_ip_adapter(write_flux_ip_adapter(tmp_path / "big.safetensors", blocks=FLUX_DOUBLE_BLOCKS + 1))
    with pytest.raises(RequestError, match="adapts 3 double blocks"):
        run(parts, [FluxIPAdapterUnit(other, [reference()])])
    lonely = FluxIPAdapterGuidance([unit(parts)], ClipVisionEncoders([tmp_path / "empty"]))
    with pytest.raises(RequestError, match="24-wide image embeddings.*models/clip_vision"):
        lonely.on_pass_start(SimpleNamespace(model=flux_checkpoint(parts)))
    assert not hasattr(parts.transformer, "encoder_hid_proj")
