"""LoRAs on tiny FLUX.1 and SD3.5 models loaded by the real DiT loader: kohya, diffusers/PEFT and
XLabs files, fused layers split by rows, exact restore, fp8 / bf16 / fp16 stored weights, GGUF.

Expected updates come from the files' raw tensors and this file's formulas; they are compared in
the *original* layout (BFL / Stability names, fused q/k/v, (shift, scale) modulations) by turning
the loaded diffusers weights back with studio.testing's own converters, never through
studio.networks.dit_lora's name maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from studio.devices import resolve_policy
from studio.families.dit_engine import dit_engine
from studio.models.catalog import CheckpointInfo, HashCache
from studio.models.dit_loader import load_dit
from studio.models.state_dict import load_state_dict, read_shapes
from studio.networks.activation import ExtraNetworks, lora_patcher
from studio.networks.dit_lora import DiTLoraPatcher
from studio.networks.lora import ActiveNetwork, LoraLibrary
from studio.prompts.parser import extract_extra_networks
from studio.testing.flux import (
    flux_transformer_config,
    flux_transformer_to_bfl,
    make_flux_checkpoint,
    make_flux_lora,
    make_flux_transformer,
    tiny_flux_components,
)
from studio.testing.quantized import make_fp8_variant, make_gguf_variant
from studio.testing.sd3 import make_sd3_checkpoint, sd3_transformer_to_original, tiny_sd3_components

RANK, ALPHA = 4, 2.0
FLUX_META = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}
SD3_META = {"ss_network_module": "networks.lora_sd3", "ss_base_model_version": "sd3"}


# --------------------------------------------------------------------------- models


def _policy():
    return resolve_policy("cpu", no_half=True, no_half_vae=True, precision="full", want_xformers=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dit-lora")


@pytest.fixture(scope="module")
def flux_parts():
    return tiny_flux_components("dev", seed=0)


def _load(root: Path, path: Path):
    return load_dit(CheckpointInfo(path=path, name=path.name), _policy(), root / "configs")


@pytest.fixture(scope="module")
def flux(root, flux_parts):
    """FLUX.1 dev from an fp32 all-in-one file: every weight in the compute dtype (merged in place)."""
    return _load(root, make_flux_checkpoint(root / "flux-fp32.safetensors", components=flux_parts,
                                            dtype=torch.float32))


@pytest.fixture(scope="module")
def flux_fp8(root, flux_parts):
    """The bf16 all-in-one file with its transformer in fp8: fp8 transformer and bf16 text encoders,
    both kept as stored on a float32 CPU."""
    full = make_flux_checkpoint(root / "flux-bf16.safetensors", components=flux_parts)
    return _load(root, make_fp8_variant(full, root / "flux-fp8.safetensors", only_prefix="model.diffusion_model."))


@pytest.fixture(scope="module")
def sd35(root):
    """SD3.5 Medium (MMDiT-X: attn2, a pre-only last context block) from an fp16 file."""
    parts = tiny_sd3_components("sd3.5-medium", seed=2)
    return _load(root, make_sd3_checkpoint(root / "sd35m.safetensors", "sd3.5-medium", components=parts))


@pytest.fixture(autouse=True)
def give_models_back(request):
    """Shared models leave each test unpatched, even a failing one."""
    yield
    for name in ("flux", "flux_fp8", "sd35"):
        if name in request.fixturenames:
            model = request.getfixturevalue(name)
            if model.lora_patcher is not None:
                model.lora_patcher.restore()


# --------------------------------------------------------------------------- helpers


def same_bits(a: Tensor, b: Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def components(model) -> dict:
    return {"unet": model.unet, **{i: te for i, te in enumerate(model.text_encoders)}}


def snapshot(model) -> dict:
    return {(c, n): p.detach().clone() for c, m in components(model).items() for n, p in m.named_parameters()}


def assert_pristine(model, original: dict) -> None:
    now = {(c, n): p for c, m in components(model).items() for n, p in m.named_parameters()}
    assert now.keys() == original.keys()
    for key, param in now.items():
        assert same_bits(param.detach(), original[key]), key


def original_layout(model) -> dict[str, Tensor]:
    """The loaded transformer's weights in the original names and layout, as float32."""
    state = {k: v.float() for k, v in model.unet.state_dict().items()}
    if model.spec.id == "flux1":
        return flux_transformer_to_bfl(state)
    return sd3_transformer_to_original(state, model.unet.config.num_layers)


def library(folder: Path) -> LoraLibrary:
    lib = LoraLibrary([folder], HashCache(folder.parent / f"{folder.name}-cache.json"))
    lib.refresh()
    return lib


def _random(generator: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=generator) * 0.1


def kohya_tensors(layers: dict[str, tuple[int, int]], seed: int) -> dict[str, Tensor]:
    """lora_down / lora_up / alpha for kohya module name -> (out, in)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_dim, in_dim) in layers.items():
        tensors[f"{name}.lora_down.weight"] = _random(generator, RANK, in_dim)
        tensors[f"{name}.lora_up.weight"] = _random(generator, out_dim, RANK)
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    return tensors


def kohya_delta(tensors: dict[str, Tensor], name: str, multiplier: float) -> Tensor:
    up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else up.shape[1]
    return multiplier * alpha / up.shape[1] * up @ down


def transformer_kohya(layout: dict[str, Tensor], prefix: str = "lora_unet_") -> dict[str, tuple[int, int]]:
    """A kohya module for every matrix of the original transformer (fused qkv / linear1 whole,
    modulations and embedders included) -> (out, in)."""
    return {prefix + key.removesuffix(".weight").replace(".", "_"): tuple(v.shape)
            for key, v in layout.items() if key.endswith(".weight") and v.ndim == 2}


def te_layers(model, index: int, kohya_prefix: str, count: int = 3) -> dict[str, tuple[str, nn.Module]]:
    """kohya name -> (module name, linear) for the first ``count`` linears of a text encoder, in
    transformers 4 names (``text_model.`` kept for the CLIPs)."""
    encoder = model.text_encoders[index]
    is_t5 = encoder.config.model_type == "t5"
    out = {}
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and len(out) < count and "projection" not in name:
            full = name if is_t5 or name.startswith("text_model.") else "text_model." + name
            out[kohya_prefix + full.replace(".", "_")] = (name, module)
    return out


def write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
          dtype: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def peft_tensors(modules: dict[str, nn.Module], prefix: str, seed: int) -> dict[str, Tensor]:
    """diffusers/PEFT ``<prefix><module>.lora_A/B.weight`` for every linear in ``modules``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in modules.items():
        out_dim, in_dim = module.out_features, module.in_features
        tensors[f"{prefix}{name}.lora_A.weight"] = _random(generator, RANK, in_dim)
        tensors[f"{prefix}{name}.lora_B.weight"] = _random(generator, out_dim, RANK)
    return tensors


def peft_metadata(*components: str, alpha: float = ALPHA) -> dict[str, str]:
    config = {}
    for component in components:
        config |= {f"{component}.r": RANK, f"{component}.lora_alpha": alpha}
    return {"lora_adapter_metadata": json.dumps(config)}


def linears(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def check_original_deltas(before: dict[str, Tensor], after: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Every original weight moved by exactly its expected update, and nothing else moved."""
    assert before.keys() == after.keys()
    for key, old in before.items():
        want = expected.get(key)
        if want is None:
            assert same_bits(after[key], old), key
        else:
            torch.testing.assert_close(after[key] - old, want, rtol=1e-4, atol=2e-6, msg=key)


def apply(model, lib: LoraLibrary, name: str, te: float = 1.0, unet: float = 1.0):
    return lora_patcher(model).apply([ActiveNetwork(lib.find(name), te, unet)], lib)


# --------------------------------------------------------------------------- kohya FLUX.1


def test_kohya_flux_lora_splits_fused_layers_by_rows_and_restores_bit_exactly(flux, flux_parts, tmp_path):
    pristine = snapshot(flux)
    before = original_layout(flux)
    layers = transformer_kohya(before)
    clip = te_layers(flux, 0, "lora_te1_")
    t5 = te_layers(flux, 1, "lora_te3_")
    tensors = kohya_tensors({**layers, **{k: tuple(m.weight.shape) for k, (_, m) in {**clip, **t5}.items()}}, seed=1)
    write(tmp_path / "Lora" / "kohya.safetensors", tensors, FLUX_META, torch.bfloat16)
    tensors = load_file(str(tmp_path / "Lora" / "kohya.safetensors"))   # the bf16 values the patcher reads
    lib = library(tmp_path / "Lora")
    assert lib.find("kohya").family == "flux1"

    report = apply(flux, lib, "kohya", te=0.5, unet=0.8)
    assert report.applied == ["kohya"] and report.warnings == [] and report.te_changed
    by_original = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key for key in before}
    expected = {by_original[k]: kohya_delta(tensors, k, 0.8) for k in layers}
    check_original_deltas(before, original_layout(flux), expected)
    # e.g. the k rows of double block 0's fused qkv are to_k's, a single block's last 4 widths proj_mlp's
    width = flux.unet.config.num_attention_heads * flux.unet.config.attention_head_dim
    k_delta = kohya_delta(tensors, "lora_unet_double_blocks_0_img_attn_qkv", 0.8)[width:2 * width]
    torch.testing.assert_close(flux.unet.transformer_blocks[0].attn.to_k.weight - pristine[("unet",
                               "transformer_blocks.0.attn.to_k.weight")], k_delta, rtol=1e-4, atol=2e-6)
    for index, table in ((0, clip), (1, t5)):
        for kohya, (name, module) in table.items():
            torch.testing.assert_close(module.weight - pristine[(index, f"{name}.weight")],
                                       kohya_delta(tensors, kohya, 0.5), rtol=1e-4, atol=2e-6)

    # the same set again does nothing; a new UNet multiplier re-merges from the originals and
    # leaves the text encoders (and the prompt cache) alone
    assert not apply(flux, lib, "kohya", te=0.5, unet=0.8).changed
    report = apply(flux, lib, "kohya", te=0.5, unet=-0.3)
    assert report.changed and not report.te_changed
    check_original_deltas(before, original_layout(flux), {k: v * (-0.3 / 0.8) for k, v in expected.items()})

    lora_patcher(flux).restore()
    assert_pristine(flux, pristine)
    assert lora_patcher(flux).current == () and lora_patcher(flux).backed_up == 0


def test_sd_scripts_file_gives_the_same_update_as_diffusers_test_expectation(flux, tmp_path):
    """studio.testing's own kohya FLUX file (what test_factory_new_families checks diffusers with)."""
    pristine = snapshot(flux)
    path = make_flux_lora(tmp_path / "Lora" / "sdscripts.safetensors", rank=RANK, alpha=ALPHA, dtype=torch.float32,
                          components={"transformer": flux.unet})
    tensors = load_file(str(path))
    lib = library(tmp_path / "Lora")
    assert apply(flux, lib, "sdscripts").warnings == []
    width = flux.unet.config.num_attention_heads * flux.unet.config.attention_head_dim
    blocks = flux.unet
    for module, fused, rows in (
        (blocks.transformer_blocks[1].attn.add_v_proj, "lora_unet_double_blocks_1_txt_attn_qkv",
         slice(2 * width, 3 * width)),
        (blocks.single_transformer_blocks[0].attn.to_q, "lora_unet_single_blocks_0_linear1", slice(0, width)),
        (blocks.single_transformer_blocks[3].proj_mlp, "lora_unet_single_blocks_3_linear1",
         slice(3 * width, 7 * width)),
    ):
        name = next(n for n, m in blocks.named_modules() if m is module)
        torch.testing.assert_close(module.weight - pristine[("unet", f"{name}.weight")],
                                   kohya_delta(tensors, fused, 1.0)[rows], rtol=1e-4, atol=2e-6)
    lora_patcher(flux).restore()
    assert_pristine(flux, pristine)


# --------------------------------------------------------------------------- diffusers / PEFT, XLabs


def test_peft_flux_lora_through_the_prompt_tags_and_the_conditioner_key(flux, tmp_path):
    pristine = snapshot(flux)
    transformer, clip = linears(flux.unet), linears(flux.text_encoders[0])
    tensors = peft_tensors(transformer, "transformer.", seed=2) | peft_tensors(clip, "text_encoder.", seed=3)
    write(tmp_path / "Lora" / "peft.safetensors", tensors, peft_metadata("transformer", "text_encoder", alpha=8.0))
    lib = library(tmp_path / "Lora")
    assert lib.find("peft").family == "flux1"   # diffusers names, FLUX.1's single blocks

    _, tags = extract_extra_networks("a red cube <lora:peft:0.5:1.5>")
    networks = ExtraNetworks(lib, None)
    result = networks.activate(flux, tags)
    assert result.notes == [] and list(result.lora_hashes) == ["peft"]
    patcher = flux.lora_patcher
    assert isinstance(patcher, DiTLoraPatcher) and flux.conditioner.weights_key == patcher.current != ()
    for prefix, modules, index, multiplier in (("transformer.", transformer, "unet", 1.5),
                                               ("text_encoder.", clip, 0, 0.5)):
        for name, module in modules.items():
            a, b = tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"]
            torch.testing.assert_close(module.weight - pristine[(index, f"{name}.weight")],
                                       multiplier * 8.0 / RANK * b @ a, rtol=1e-4, atol=2e-6)

    result = networks.activate(flux, [])     # no tags: the model is given back
    assert result.notes == [] and flux.conditioner.weights_key == ()
    assert_pristine(flux, pristine)


def test_xlabs_processor_lora_updates_attention_rows_only(flux, tmp_path):
    pristine = snapshot(flux)
    before = original_layout(flux)
    width = flux.unet.config.num_attention_heads * flux.unet.config.attention_head_dim
    mlp_in = before["single_blocks.0.linear2.weight"].shape[1]
    layers = {"double_blocks.0.processor.qkv_lora1": (3 * width, width),
              "double_blocks.0.processor.qkv_lora2": (3 * width, width),
              "double_blocks.1.processor.proj_lora1": (width, width),
              "double_blocks.1.processor.proj_lora2": (width, width),
              "single_blocks.2.processor.qkv_lora": (3 * width, width),
              "single_blocks.2.processor.proj_lora": (width, mlp_in)}
    generator = torch.Generator().manual_seed(4)
    tensors = {}
    for name, (out_dim, in_dim) in layers.items():
        tensors[f"{name}.down.weight"] = _random(generator, RANK, in_dim)
        tensors[f"{name}.up.weight"] = _random(generator, out_dim, RANK)
    write(tmp_path / "Lora" / "xlabs.safetensors", tensors)
    lib = library(tmp_path / "Lora")
    assert lib.find("xlabs").family == "flux1"

    assert apply(flux, lib, "xlabs", unet=0.7).warnings == []

    def delta(name: str) -> Tensor:   # XLabs has no alpha: scale 1
        return 0.7 * tensors[f"{name}.up.weight"] @ tensors[f"{name}.down.weight"]

    linear1 = before["single_blocks.2.linear1.weight"]
    expected = {
        "double_blocks.0.img_attn.qkv.weight": delta("double_blocks.0.processor.qkv_lora1"),
        "double_blocks.0.txt_attn.qkv.weight": delta("double_blocks.0.processor.qkv_lora2"),
        "double_blocks.1.img_attn.proj.weight": delta("double_blocks.1.processor.proj_lora1"),
        "double_blocks.1.txt_attn.proj.weight": delta("double_blocks.1.processor.proj_lora2"),
        # q/k/v rows of linear1; its MLP rows stay
        "single_blocks.2.linear1.weight": torch.cat([delta("single_blocks.2.processor.qkv_lora"),
                                                     torch.zeros(linear1.shape[0] - 3 * width, width)]),
        "single_blocks.2.linear2.weight": delta("single_blocks.2.processor.proj_lora"),
    }
    after = original_layout(flux)
    mlp = slice(3 * width, None)
    assert same_bits(after["single_blocks.2.linear1.weight"][mlp], linear1[mlp])
    check_original_deltas(before, after, expected)
    lora_patcher(flux).restore()
    assert_pristine(flux, pristine)


# --------------------------------------------------------------------------- SD3 / SD3.5


def test_kohya_sd3_lora_with_clip_g_and_t5(sd35, tmp_path):
    """fp16 weights on a float32 CPU stay fp16 until a LoRA touches them; the swapped final and
    pre-only context modulations and SD3.5 Medium's attn2 are covered by the whole-model check."""
    pristine = snapshot(sd35)
    before = original_layout(sd35)
    layers = transformer_kohya(before)
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in layers
    clip_g, t5 = te_layers(sd35, 1, "lora_te2_"), te_layers(sd35, 2, "lora_te3_")
    tensors = kohya_tensors({**layers, **{k: tuple(m.weight.shape) for k, (_, m) in {**clip_g, **t5}.items()}},
                            seed=5)
    write(tmp_path / "Lora" / "sd3kohya.safetensors", tensors)
    lib = library(tmp_path / "Lora")
    assert lib.find("sd3kohya").family == "sd3"     # from the joint_blocks names alone

    report = apply(sd35, lib, "sd3kohya", te=0.6, unet=0.9)
    assert report.warnings == [] and report.te_changed
    by_original = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key for key in before}
    check_original_deltas(before, original_layout(sd35), {by_original[k]: kohya_delta(tensors, k, 0.9)
                                                           for k in layers})
    for index, table in ((1, clip_g), (2, t5)):
        for kohya, (name, module) in table.items():
            assert module.weight.dtype == torch.float32   # merged in the compute dtype
            original = pristine[(index, f"{name}.weight")]
            assert original.dtype == torch.float16
            torch.testing.assert_close(module.weight - original.float(), kohya_delta(tensors, kohya, 0.6),
                                       rtol=1e-4, atol=2e-6)
    lora_patcher(sd35).restore()
    assert_pristine(sd35, pristine)


def test_peft_sd3_lora(sd35, tmp_path):
    pristine = snapshot(sd35)
    transformer, clip_g = linears(sd35.unet), linears(sd35.text_encoders[1])
    tensors = peft_tensors(transformer, "transformer.", seed=6) | peft_tensors(clip_g, "text_encoder_2.", seed=7)
    write(tmp_path / "Lora" / "sd3peft.safetensors", tensors, peft_metadata("transformer", "text_encoder_2"))
    lib = library(tmp_path / "Lora")
    assert lib.find("sd3peft").family is None     # diffusers names without FLUX's single blocks: either family

    assert apply(sd35, lib, "sd3peft", te=1.0, unet=0.5).warnings == []
    for prefix, modules, index, multiplier in (("transformer.", transformer, "unet", 0.5),
                                               ("text_encoder_2.", clip_g, 1, 1.0)):
        for name, module in modules.items():
            a, b = tensors[f"{prefix}{name}.lora_A.weight"], tensors[f"{prefix}{name}.lora_B.weight"]
            torch.testing.assert_close(module.weight - pristine[(index, f"{name}.weight")].float(),
                                       multiplier * ALPHA / RANK * b @ a, rtol=1e-4, atol=2e-6)
    lora_patcher(sd35).restore()
    assert_pristine(sd35, pristine)


# --------------------------------------------------------------------------- storage: fp8, GGUF


def test_fp8_weights_merge_in_the_compute_dtype_and_come_back_as_stored(flux_fp8, tmp_path):
    model = flux_fp8
    layer = model.unet.transformer_blocks[0].attn.to_k
    param, stored = layer.weight, layer.weight.data
    assert stored.dtype == torch.float8_e4m3fn
    pristine = snapshot(model)
    before = original_layout(model)
    layers = transformer_kohya(before)
    clip = te_layers(model, 0, "lora_te1_")
    tensors = kohya_tensors({**layers, **{k: tuple(m.weight.shape) for k, (_, m) in clip.items()}}, seed=8)
    write(tmp_path / "Lora" / "fp8.safetensors", tensors, FLUX_META)
    lib = library(tmp_path / "Lora")

    assert apply(model, lib, "fp8", te=1.0, unet=1.0).warnings == []
    by_original = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): key for key in before}
    check_original_deltas(before, original_layout(model), {by_original[k]: kohya_delta(tensors, k, 1.0)
                                                           for k in layers})
    # the same Parameter now holds a float32 merge, and the layer computes with the LoRA: not
    # rounded back to fp8 (that would lose most of it)
    assert layer.weight is param and param.dtype == torch.float32
    width = model.unet.config.num_attention_heads * model.unet.config.attention_head_dim
    expected = stored.float() + kohya_delta(tensors, "lora_unet_double_blocks_0_img_attn_qkv", 1.0)[width:2 * width]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.bias), rtol=1e-4, atol=1e-5)
    assert (param.to(torch.float8_e4m3fn).float() - param).abs().max() > 0   # fp8 could not hold it
    for kohya, (name, module) in clip.items():   # bf16 CLIP-L, merged in float32 too
        torch.testing.assert_close(module.weight - pristine[(0, f"{name}.weight")].float(),
                                   kohya_delta(tensors, kohya, 1.0), rtol=1e-4, atol=2e-6)

    lora_patcher(model).restore()
    assert layer.weight is param and param.data.data_ptr() == stored.data_ptr()   # the stored tensor itself
    assert_pristine(model, pristine)


@pytest.fixture(scope="module")
def gguf_pair(root, flux_parts):
    """A Q8_0 GGUF transformer and a plain float32 one holding its dequantized weights."""
    source = make_flux_transformer(root / "flux1-dev.safetensors", components=flux_parts)
    path = make_gguf_variant(source, root / "flux1-dev-Q8_0.gguf", "Q8_0")
    quantized = dit_engine("flux1").build_transformer(load_state_dict(path), read_shapes(path), "", _policy(),
                                                      root / "configs", path.name)
    plain = FluxTransformer2DModel(**flux_transformer_config("dev")).eval().requires_grad_(False)
    plain.load_state_dict({k: dequantize_gguf_tensor(v).float() for k, v in quantized.state_dict().items()})
    return quantized, plain


def _flux_inputs(transformer) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    return {
        "hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3),
    }


@pytest.mark.slow  # heavy; the quick suite keeps this family's other engine tests
def test_gguf_layers_add_the_lora_on_compute(gguf_pair, tmp_path):
    quantized, plain = gguf_pair
    layout = flux_transformer_to_bfl({k: v.float() for k, v in plain.state_dict().items()})
    tensors = kohya_tensors(transformer_kohya(layout), seed=9)
    write(tmp_path / "Lora" / "gguf.safetensors", tensors, FLUX_META)
    lib = library(tmp_path / "Lora")
    raw = {n: p.detach().clone() for n, p in quantized.named_parameters()}
    inputs = _flux_inputs(quantized)
    with torch.no_grad():
        without = quantized(**inputs).sample

    patcher = DiTLoraPatcher(quantized, [], "flux1", torch.float32)
    report = patcher.apply([ActiveNetwork(lib.find("gguf"), 1.0, 0.8)], lib)
    assert report.warnings == []
    for name, param in quantized.named_parameters():   # nothing merged into the quantized data
        assert same_bits(param.detach(), raw[name]), name

    # one layer: dequantized weight + ΔW
    width = quantized.config.num_attention_heads * quantized.config.attention_head_dim
    layer = quantized.single_transformer_blocks[1].proj_mlp
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    delta = kohya_delta(tensors, "lora_unet_single_blocks_1_linear1", 0.8)[3 * width:]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, dequantize_gguf_tensor(layer.weight) + delta, layer.bias),
                                   rtol=1e-4, atol=1e-5)
    # the whole transformer: as the dequantized model with the same LoRA merged
    reference = DiTLoraPatcher(plain, [], "flux1", torch.float32)
    reference.apply([ActiveNetwork(lib.find("gguf"), 1.0, 0.8)], lib)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**inputs).sample, plain(**inputs).sample, rtol=1e-4, atol=1e-4)
    reference.restore()

    patcher.restore()
    assert all(not m._forward_hooks for m in quantized.modules())
    with torch.no_grad():
        assert same_bits(quantized(**inputs).sample, without)


def test_loha_on_a_fused_layer_is_split_by_rows_merged_or_on_compute(flux, gguf_pair, tmp_path):
    """A dense (LyCORIS LoHa) update of single block 0's linear1: rows of ΔW, merged into the
    float32 model and added on compute by the GGUF one."""
    pristine = snapshot(flux)
    before = original_layout(flux)
    out_dim, in_dim = before["single_blocks.0.linear1.weight"].shape
    generator = torch.Generator().manual_seed(14)
    name = "lora_unet_single_blocks_0_linear1"
    tensors = {f"{name}.alpha": torch.tensor(ALPHA)}
    for half in ("w1", "w2"):
        tensors[f"{name}.hada_{half}_a"] = _random(generator, out_dim, RANK)
        tensors[f"{name}.hada_{half}_b"] = _random(generator, RANK, in_dim)
    write(tmp_path / "Lora" / "loha.safetensors", tensors, FLUX_META)
    lib = library(tmp_path / "Lora")
    first, second = (tensors[f"{name}.hada_{half}_a"] @ tensors[f"{name}.hada_{half}_b"] for half in ("w1", "w2"))
    delta = 0.6 * ALPHA / RANK * first * second

    assert apply(flux, lib, "loha", unet=0.6).warnings == []
    check_original_deltas(before, original_layout(flux), {"single_blocks.0.linear1.weight": delta})
    lora_patcher(flux).restore()
    assert_pristine(flux, pristine)

    quantized, _ = gguf_pair
    patcher = DiTLoraPatcher(quantized, [], "flux1", torch.float32)
    assert patcher.apply([ActiveNetwork(lib.find("loha"), 1.0, 0.6)], lib).warnings == []
    width = quantized.config.num_attention_heads * quantized.config.attention_head_dim
    layer = quantized.single_transformer_blocks[0].attn.to_v
    x = torch.randn(4, layer.in_features, generator=generator)
    with torch.no_grad():
        want = F.linear(x, dequantize_gguf_tensor(layer.weight) + delta[2 * width:3 * width], layer.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    patcher.restore()


# --------------------------------------------------------------------------- names and families


def test_other_families_are_skipped_with_a_note(flux, sd35, tmp_path):
    pristine = snapshot(flux)
    generator = torch.Generator().manual_seed(10)
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
           _random(generator, RANK, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
           _random(generator, 320, RANK)}
    write(tmp_path / "Lora" / "sd1style.safetensors", sd1, {"ss_base_model_version": "sd_v1"})
    write(tmp_path / "Lora" / "fluxonly.safetensors",
          kohya_tensors(transformer_kohya(original_layout(flux)), seed=11), FLUX_META)
    lib = library(tmp_path / "Lora")

    report = apply(flux, lib, "sd1style")
    assert report.applied == []
    assert report.warnings == ["lora 'sd1style' is for SD1, the loaded model is FLUX.1: skipped"]
    assert_pristine(flux, pristine)

    sd3_pristine = snapshot(sd35)
    report = apply(sd35, lib, "fluxonly")
    assert report.applied == [] and "is for FLUX.1, the loaded model is SD3" in report.warnings[0]
    assert_pristine(sd35, sd3_pristine)


def test_unknown_modules_are_reported_and_the_rest_applied(flux, tmp_path):
    pristine = snapshot(flux)
    tensors = kohya_tensors({"lora_unet_double_blocks_0_img_attn_proj": (64, 64),
                             "lora_unet_double_blocks_0_no_such_layer": (64, 64)}, seed=12)
    tensors["lora_unet_double_blocks_0_img_attn_proj.strange_part"] = torch.zeros(2)
    write(tmp_path / "Lora" / "partial.safetensors", tensors, FLUX_META)
    misfit = kohya_tensors({"lora_unet_double_blocks_0_img_attn_qkv": (100, 64)}, seed=13)
    write(tmp_path / "Lora" / "misfit.safetensors", misfit, FLUX_META)
    lib = library(tmp_path / "Lora")

    report = apply(flux, lib, "partial")
    assert report.applied == ["partial"]
    assert any("1 of 2 modules match no layer" in w and "no_such_layer" in w for w in report.warnings)
    assert any("unrecognised keys" in w for w in report.warnings)
    proj = flux.unet.transformer_blocks[0].attn.to_out[0]
    torch.testing.assert_close(proj.weight - pristine[("unet", "transformer_blocks.0.attn.to_out.0.weight")],
                               kohya_delta(tensors, "lora_unet_double_blocks_0_img_attn_proj", 1.0),
                               rtol=1e-4, atol=2e-6)

    report = apply(flux, lib, "misfit")     # 100 rows split nowhere: the whole file is left out
    assert report.applied == [] and "do not fit" in report.warnings[0]
    assert_pristine(flux, pristine)
