"""IP-Adapters: tiny real-layout files (loadable by diffusers' own loader), the CLIP vision
encoders, and the step callback: equal to diffusers' UNet + IP-Adapter, weight 0 = none, the
window, several images and units, the SDXL layout, and the UNet restored after the pass."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.controlnet.clip_vision import (
    ClipVisionEncoders,
    clip_vision_config,
    load_clip_vision,
    scan_clip_vision,
)
from studio.controlnet.ip_adapter import (
    IP_ADAPTER_MODULES,
    IPAdapterGuidance,
    IPAdapterUnit,
    is_ip_adapter_file,
    is_ip_adapter_state_dict,
    load_ip_adapter,
    probe_ip_adapter,
)
from studio.errors import RequestError
from studio.generation.step_callbacks import ModelCall, PassInfo
from studio.models.state_dict import ModelFileError
from studio.testing import tiny_components
from studio.testing.ip_adapters import build_clip_vision, unet_layers, write_clip_vision, write_ip_adapter

# the modules' own checks against diffusers; the engine-level tests of the same models run in the main command
pytestmark = pytest.mark.slow

PROJ, HIDDEN, SIZE = 24, 32, 32  # the tiny encoder: image_embeds 24 wide, hidden states 32 wide


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ipa")
    parts = tiny_components("sd1", seed=1)
    unet = parts["unet"]
    folder = root / "models" / "ipadapter"
    write_ip_adapter(folder / "ip-adapter_sd15.safetensors", unet, "base", PROJ, seed=2)
    write_ip_adapter(folder / "ip-adapter-plus_sd15.bin", unet, "plus", HIDDEN, seed=3)
    write_ip_adapter(folder / "ip-adapter-full-face_sd15.safetensors", unet, "full_face", HIDDEN, seed=4)
    write_ip_adapter(folder / "ip-adapter-faceid_sd15.bin", unet, "faceid", PROJ, seed=5)
    encoder = write_clip_vision(root / "models" / "clip_vision" / "clip_vision_h.safetensors", HIDDEN, 2, PROJ,
                                SIZE, 8, seed=6)
    return SimpleNamespace(root=root, unet=unet, parts=parts, folder=folder, encoder=encoder,
                           encoders=ClipVisionEncoders([root / "models" / "clip_vision",
                                                        root / "models" / "annotators" / "clip_vision"]))


def images(n: int = 1, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(n)]


def call(x, context, step=0, steps=4, groups=2, batch=1, has_uncond=True, added=None) -> ModelCall:
    return ModelCall(step, step, steps, 10, 1.0, x, context, added, groups, batch, has_uncond)


def inputs(groups=2, batch=1, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups * batch, 4, 8, 8, generator=g), torch.randn(groups * batch, 7, width, generator=g)


def run_guided(unet, units, encoders, x, ctx, steps_at=(0,), steps=4, added=None, groups=2, batch=1):
    """The UNet output with the callback, as the loop calls it (inside inference mode)."""
    guidance = IPAdapterGuidance(units, encoders)
    run = PassInfo(SimpleNamespace(unet=unet), steps, [1])
    outs = []
    with torch.inference_mode():
        guidance.on_pass_start(run)
        try:
            for step in steps_at:
                extra = guidance.unet_kwargs(call(x, ctx, step, steps, groups, batch, True, added))
                merged = {**(added or {}), **extra["added_cond_kwargs"]}
                outs.append(unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=merged).sample)
        finally:
            guidance.on_pass_end(run)
    return outs


def plain(unet, x, ctx, added=None):
    with torch.inference_mode():
        return unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- files


def test_tiny_files_load_with_diffusers_own_loader(setup):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = setup.parts
    for name in ("ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.bin", "ip-adapter-full-face_sd15.safetensors"):
        pipe = StableDiffusionPipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                                       copy.deepcopy(setup.unet), DDIMScheduler(), None, None, None,
                                       requires_safety_checker=False)
        pipe.load_ip_adapter(str(setup.folder), subfolder="", weight_name=name, image_encoder_folder=None)
        assert pipe.unet.config.encoder_hid_dim_type == "ip_image_proj", name
        ours = load_ip_adapter(setup.folder / name).state_dict["ip_adapter"]
        procs = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
        assert len(procs) == len(ours) // 2
        assert torch.equal(procs[0].to_k_ip[0].weight, ours["1.to_k_ip.weight"])
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(clip_vision_config(load_clip_vision(setup.encoder).state_dict()))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(setup.encoder)), strict=True)  # transformers' own names


def test_probe_kinds_and_refusals(setup):
    base = load_ip_adapter(setup.folder / "ip-adapter_sd15.safetensors")
    plus = load_ip_adapter(setup.folder / "ip-adapter-plus_sd15.bin")
    face = load_ip_adapter(setup.folder / "ip-adapter-full-face_sd15.safetensors")
    assert (base.kind, base.image_embed_dim, base.uses_hidden_states) == ("base", PROJ, False)
    assert (plus.kind, plus.image_embed_dim, plus.uses_hidden_states) == ("plus", HIDDEN, True)
    assert (face.kind, face.uses_hidden_states) == ("full_face", True)
    assert base.probe.layers == sum(n.endswith("attn2.processor") for n in setup.unet.attn_processors)
    assert base.family is None  # a 32-wide context is no real model's; 768 -> sd1, 2048 -> sdxl
    assert is_ip_adapter_file(setup.folder / "ip-adapter_sd15.safetensors")
    assert is_ip_adapter_file(setup.folder / "ip-adapter-plus_sd15.bin")
    assert is_ip_adapter_state_dict(["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"])
    assert is_ip_adapter_state_dict({"image_proj": {}, "ip_adapter": {}})
    assert not is_ip_adapter_state_dict(["input_hint_block.0.weight", "adapter.conv_in.weight"])
    with pytest.raises(RequestError, match="FaceID"):
        load_ip_adapter(setup.folder / "ip-adapter-faceid_sd15.bin")
    assert set(IP_ADAPTER_MODULES) == {"ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_g",
                                       "ip-adapter_clip_sdxl", "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto"}
    with pytest.raises(TypeError):
        IP_ADAPTER_MODULES["x"] = None  # type: ignore[index]


def test_clip_vision_files_config_and_layouts(tmp_path):
    a = write_clip_vision(tmp_path / "clip_vision" / "clip_vision_g.safetensors", 32, 3, 16, 48, 16, seed=1)
    b = write_clip_vision(tmp_path / "annotators" / "clip_vision" / "clip_h.pth", 32, 2, 24, 32, 8, seed=2,
                          prefix="clip_vision.")
    (tmp_path / "clip_vision" / "notes.txt").write_text("x")
    assert scan_clip_vision([tmp_path / "clip_vision", tmp_path / "annotators" / "clip_vision",
                             tmp_path / "missing"]) == [b.resolve(), a.resolve()]
    config = clip_vision_config(load_clip_vision(a).state_dict())
    assert (config.hidden_size, config.num_hidden_layers, config.projection_dim, config.image_size,
            config.patch_size, config.num_attention_heads) == (32, 3, 16, 48, 16, 2)
    loaded = load_clip_vision(b).state_dict()
    ref = build_clip_vision(32, 2, 24, 32, 8, seed=2).state_dict()
    assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    open_clip = tmp_path / "open_clip.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 3)}, str(open_clip))
    with pytest.raises(ModelFileError, match="OpenCLIP"):
        load_clip_vision(open_clip)


def test_encoder_is_picked_by_width_then_name(tmp_path):
    folder = tmp_path / "clip_vision"
    write_clip_vision(folder / "a_clip_vision_g.safetensors", 32, 1, 24, 32, 8, seed=1)
    write_clip_vision(folder / "b_clip_vision_h.safetensors", 32, 1, 24, 32, 8, seed=2)
    write_clip_vision(folder / "c_other.safetensors", 48, 1, 40, 32, 8, seed=3)
    encoders = ClipVisionEncoders([folder])
    assert encoders.pick(24, False, "clip_h").path.name == "b_clip_vision_h.safetensors"
    assert encoders.pick(24, False, "clip_g").path.name == "a_clip_vision_g.safetensors"
    assert encoders.pick(48, True, "clip_h").path.name == "c_other.safetensors"  # width wins over the name
    with pytest.raises(RequestError, match="models/clip_vision"):
        encoders.pick(1280, True, "clip_h")
    first = encoders.load(encoders.pick(24, False), torch.float32, "cpu")
    assert encoders.load(encoders.pick(24, False), torch.float32, "cpu") is first


# --------------------------------------------------------------------------- the callback


def diffusers_reference(setup, name, ims, x, ctx, scale=1.0):
    """diffusers' own path: pipeline loader, its image encoding and CFG layout, its UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    parts = setup.parts
    encoder = CLIPVisionModelWithProjection(clip_vision_config(load_file(str(setup.encoder)))).eval()
    encoder.load_state_dict(load_file(str(setup.encoder)), strict=True)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                   resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    pipe = StableDiffusionPipeline(parts["vae"], parts["text_encoder"], parts["tokenizer"], copy.deepcopy(setup.unet),
                                   DDIMScheduler(), None, processor, encoder, requires_safety_checker=False)
    pipe.load_ip_adapter(str(setup.folder), subfolder="", weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    with torch.inference_mode():
        embeds = pipe.prepare_ip_adapter_image_embeds([ims], None, "cpu", 1, True)
        return pipe.unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs={"image_embeds": embeds}).sample


@pytest.mark.parametrize("name,count", [("ip-adapter_sd15.safetensors", 1), ("ip-adapter-plus_sd15.bin", 2)])
def test_equals_diffusers_ip_adapter(setup, name, count):
    x, ctx = inputs()
    ims = images(count)
    ref = diffusers_reference(setup, name, ims, x, ctx)
    unet = copy.deepcopy(setup.unet)
    unit = IPAdapterUnit(load_ip_adapter(setup.folder / name), ims, 1.0, 0.0, 1.0, "ip-adapter_clip_h", "concat")
    (out,) = run_guided(unet, [unit], setup.encoders, x, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain(setup.unet, x, ctx), atol=1e-4)


def test_weight_zero_is_none_window_and_restore(setup):
    x, ctx = inputs(groups=2, batch=2)
    unet = copy.deepcopy(setup.unet)
    procs = dict(unet.attn_processors)
    config = dict(unet.config)
    keys = set(unet.state_dict())
    none = plain(unet, x, ctx)
    weights = load_ip_adapter(setup.folder / "ip-adapter-plus_sd15.bin")
    (zero,) = run_guided(unet, [IPAdapterUnit(weights, images(), 0.0)], setup.encoders, x, ctx, batch=2)
    assert torch.equal(zero, none)
    late = IPAdapterUnit(weights, images(), 1.0, 0.5, 1.0)
    # steps 0..3 of 4 are at 0, .25, .5, .75: only the last two are inside [0.5, 1]
    outs = run_guided(unet, [late], setup.encoders, x, ctx, steps_at=(0, 1, 2, 3), batch=2)
    assert torch.equal(outs[0], none) and torch.equal(outs[1], none)
    assert not torch.allclose(outs[2], none, atol=1e-4) and torch.equal(outs[2], outs[3])
    # the UNet is exactly as before: processors (the same objects), no projection, config, weights
    assert unet.attn_processors == procs
    assert unet.encoder_hid_proj is None and "encoder_hid_proj" not in unet._modules
    assert unet.config.encoder_hid_dim_type is None and dict(unet.config) == config
    assert set(unet.state_dict()) == keys
    assert torch.equal(plain(unet, x, ctx), none)


def test_two_units_and_layout(setup):
    x, ctx = inputs(groups=3, batch=2)
    units = [IPAdapterUnit(load_ip_adapter(setup.folder / "ip-adapter_sd15.safetensors"), images(2), 0.7),
             IPAdapterUnit(load_ip_adapter(setup.folder / "ip-adapter-full-face_sd15.safetensors"), images(1), 0.4)]
    guidance = IPAdapterGuidance(units, setup.encoders)
    unet = copy.deepcopy(setup.unet)
    run = PassInfo(SimpleNamespace(unet=unet), 4, [1, 2])
    with torch.inference_mode():
        guidance.on_pass_start(run)
        try:
            kwargs = guidance.unet_kwargs(call(x, ctx, groups=3, batch=2))
            base, face = kwargs["added_cond_kwargs"]["image_embeds"]
            assert base.shape == (6, 2, PROJ) and face.shape == (6, 1, (SIZE // 8) ** 2 + 1, HIDDEN)
            assert not base[:2].any() and base[2:].abs().sum() > 0  # negative block: zero image_embeds
            assert torch.equal(base[2], base[5]) and torch.equal(face[0], face[1]) and torch.equal(face[2], face[4])
            scales = {tuple(p.scale) for p in unet.attn_processors.values() if hasattr(p, "scale")}
            assert scales == {(0.7, 0.4)}
            without = guidance.unet_kwargs(call(x[2:], ctx[2:], groups=2, batch=2, has_uncond=False))
            assert without["added_cond_kwargs"]["image_embeds"][0].shape == (4, 2, PROJ)
            out = unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=kwargs["added_cond_kwargs"]).sample
            assert out.shape == x.shape
        finally:
            guidance.on_pass_end(run)


def test_sdxl_with_the_loops_added_conditioning(tmp_path, setup):
    parts = tiny_components("sdxl", seed=1)
    unet = parts["unet"]
    path = write_ip_adapter(tmp_path / "ip-adapter_sdxl_vit-h.safetensors", unet, "base", PROJ, seed=7)
    weights = load_ip_adapter(path)
    x, ctx = inputs(width=unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, parts["text_encoder_2"].config.hidden_size),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    none = plain(unet, x, ctx, added)
    (zero,) = run_guided(unet, [IPAdapterUnit(weights, images(), 0.0, module="ip-adapter_clip_sdxl_plus_vith")],
                         setup.encoders, x, ctx, added=added)
    (one,) = run_guided(unet, [IPAdapterUnit(weights, images(), 1.0, module="ip-adapter_clip_sdxl_plus_vith")],
                        setup.encoders, x, ctx, added=added)
    assert torch.equal(zero, none) and not torch.allclose(one, none, atol=1e-4)
    assert torch.equal(plain(unet, x, ctx, added), none)
    # an SDXL adapter on an SD1 UNet is refused, the UNet untouched
    with pytest.raises(RequestError, match="cross-attention"):
        run_guided(copy.deepcopy(setup.unet), [IPAdapterUnit(weights, images())], setup.encoders, *inputs())


def test_missing_encoder_is_a_request_error(setup, tmp_path):
    unet = copy.deepcopy(setup.unet)
    procs = dict(unet.attn_processors)
    unit = IPAdapterUnit(load_ip_adapter(setup.folder / "ip-adapter-plus_sd15.bin"), images())
    with pytest.raises(RequestError, match="models/clip_vision"):
        run_guided(unet, [unit], ClipVisionEncoders([tmp_path / "empty"]), *inputs())
    assert unet.attn_processors == procs and unet.encoder_hid_proj is None


def test_policy_dtype_and_a_second_pass(setup):
    """The adapters go where the device policy says (bf16 here), and one callback serves two
    passes (hires fix), reinstalled and restored each time."""
    unet = copy.deepcopy(setup.unet).to(torch.bfloat16)
    procs = dict(unet.attn_processors)
    x, ctx = (t.to(torch.bfloat16) for t in inputs())
    model = SimpleNamespace(unet=unet, policy=SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16))
    guidance = IPAdapterGuidance([IPAdapterUnit(load_ip_adapter(setup.folder / "ip-adapter-plus_sd15.bin"),
                                                images())], setup.encoders)
    outs = []
    with torch.inference_mode():
        for _ in range(2):
            run = PassInfo(model, 4, [1])
            guidance.on_pass_start(run)
            try:
                embeds = guidance.unet_kwargs(call(x, ctx))["added_cond_kwargs"]
                assert embeds["image_embeds"][0].dtype == torch.bfloat16
                assert all(p.dtype == torch.bfloat16 for p in unet.encoder_hid_proj.parameters())
                outs.append(unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=embeds).sample)
            finally:
                guidance.on_pass_end(run)
            assert unet.attn_processors == procs and unet.encoder_hid_proj is None
    assert torch.equal(outs[0], outs[1])


def test_several_images_are_averaged_as_the_extension_does(setup):
    x, ctx = inputs()
    weights = load_ip_adapter(setup.folder / "ip-adapter_sd15.safetensors")
    a, b = images(2)
    (one,) = run_guided(copy.deepcopy(setup.unet), [IPAdapterUnit(weights, [a])], setup.encoders, x, ctx)
    (same,) = run_guided(copy.deepcopy(setup.unet), [IPAdapterUnit(weights, [a, a])], setup.encoders, x, ctx)
    (two,) = run_guided(copy.deepcopy(setup.unet), [IPAdapterUnit(weights, [a, b])], setup.encoders, x, ctx)
    (concat,) = run_guided(copy.deepcopy(setup.unet), [IPAdapterUnit(weights, [a, b], multi_image="concat")],
                           setup.encoders, x, ctx)
    torch.testing.assert_close(same, one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(two, one, atol=1e-4)
    # the two images' tokens side by side, not averaged: a small but real difference
    assert not torch.allclose(concat, two, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hidden,layers,heads,inter,proj,act", [
    (1280, 32, 16, 5120, 1024, "gelu"),        # OpenCLIP ViT-H/14 (clip_vision_h, h94 image_encoder)
    (1664, 48, 16, 8192, 1280, "gelu"),        # ViT-bigG/14 (clip_vision_g, h94 sdxl_models/image_encoder)
    (1024, 24, 16, 4096, 768, "quick_gelu"),   # OpenAI ViT-L/14
])
def test_real_encoder_configs_from_shapes(hidden, layers, heads, inter, proj, act):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    real = CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, projection_dim=proj, image_size=224, patch_size=14)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(real)
    shapes = {"clip_vision." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = clip_vision_config(shapes)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.projection_dim, config.image_size, config.patch_size, config.hidden_act) == \
        (hidden, layers, heads, inter, proj, 224, 14, act)


SD15 = {"cross_attention_dim": 768}  # diffusers' default UNet is SD1's layout
SDXL = {"block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True}


@pytest.mark.parametrize("config,proj,kind,family,embed,layers", [
    (SD15, {"proj.weight": (768 * 4, 1024), "norm.weight": (768,)}, "base", "sd1", 1024, 16),
    (SD15, {"latents": (1, 16, 768), "proj_in.weight": (768, 1280), "proj_out.weight": (768, 768)},
     "plus", "sd1", 1280, 16),
    (SDXL, {"proj.weight": (2048 * 4, 1280), "norm.weight": (2048,)}, "base", "sdxl", 1280, 70),
    (SDXL, {"latents": (1, 16, 1280), "proj_in.weight": (1280, 1280), "proj_out.weight": (2048, 1280)},
     "plus", "sdxl", 1280, 70),
])
def test_real_adapter_shapes(config, proj, kind, family, embed, layers):
    shapes = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, (hidden, width) in enumerate(unet_layers(config)):
        shapes[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = (hidden, width)
        shapes[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = (hidden, width)
    probe = probe_ip_adapter(shapes, "ip-adapter.safetensors")
    assert (probe.kind, probe.family, probe.image_embed_dim, probe.layers) == (kind, family, embed, layers)
