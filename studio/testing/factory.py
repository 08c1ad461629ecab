"""Tiny random Stable Diffusion models in every file format the studio reads.

The models have the real architecture of each family (SD1, SD2, SDXL and their
inpaint / v-prediction variants, and the SDXL refiner), the real CLIP tokenizer and the real VAE
downscale of 8, but only a few MB of random weights, so they build in a couple
of seconds on a CPU. They serve the test suite and the studio's demo model.

Head counts cannot be read from tensor shapes, so the studio's loader has to
guess them; :func:`heads_for` and :func:`te_heads` are the conventions of the
real models, and every tiny model follows them.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.models.ldm_keys import (
    UNET_PREFIX,
    VAE_PREFIX,
    base_family,
    open_clip_to_ldm,
    to_ldm_state_dict,
    unet_to_ldm,
    vae_to_ldm,
)
from studio.models.probe import REFINER_TE
from studio.models.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    make_clip_tokenizer,
    write_tokenizer_files,
)

FAMILIES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-inpaint")
# The SDXL refiner is kept out of FAMILIES: it is no text-to-image model of its own (no CLIP-L,
# no ``tokenizer``), so the per-family round trips over FAMILIES do not apply to it as they stand.
REFINER = "sdxl-refiner"

UNET_CHANNELS = (32, 64)
UNET_LAYERS_PER_BLOCK = 2
# 4 levels, as in SD's VAE: 3 downsamples give the real 8x latent scale
# (64x64 px <-> 8x8 latents), which the studio's size logic assumes.
VAE_CHANNELS = (32, 32, 64, 64)
LATENT_CHANNELS = 4
NORM_GROUPS = 32
TE_HIDDEN = 32
# SDXL's second encoder must differ in width from the first: diffusers picks
# the converter for each encoder by comparing widths (formats.md 1.5).
SDXL_TE2_HIDDEN = 64
TE_LAYERS = 2
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_POSITIONS = 77
SDXL_TIME_EMBED_DIM = 8
# The refiner's size/crop/aesthetic numbers: original h, w, crop top, left, aesthetic score.
REFINER_TIME_IDS = 5
# Sample size in latents: pipelines default to sample_size * 8 px.
UNET_SAMPLE_SIZE = 8

_SEED_NOISE = 0.02
_CONV_OUT_SCALE = 0.01


# --------------------------------------------------------------------------- conventions


def is_inpaint(family: str) -> bool:
    return _check(family).endswith("-inpaint")


def prediction_type(family: str) -> str:
    return "v_prediction" if _check(family) == "sd2-v" else "epsilon"


def is_refiner(family: str) -> bool:
    return _check(family) == REFINER


def _check(family: str) -> str:
    if family not in (*FAMILIES, REFINER):
        raise ValueError(f"unknown model family {family!r}; expected one of {(*FAMILIES, REFINER)}")
    return family


def heads_for(family: str, channels: int) -> int:
    """UNet attention heads of a block with ``channels`` channels.

    SD1 uses 8 heads everywhere; SD2 and SDXL use 64-wide heads. In diffusers'
    configs this count goes into ``attention_head_dim`` (its legacy meaning).
    """
    return 8 if base_family(family) == "sd1" else max(1, channels // 64)


def te_heads(hidden: int) -> int:
    """Text-encoder heads: CLIP-L, OpenCLIP-H and bigG all use 64-wide heads."""
    return max(1, hidden // 64)


def scaling_factor(family: str) -> float:
    return 0.13025 if base_family(family) == "sdxl" else 0.18215


def pad_token(family: str, which: int = 1) -> str:
    """Pad token of the family's tokenizer ``which`` (1 or 2)."""
    return "!" if base_family(family) == "sd2" or which == 2 else EOS_TOKEN


# --------------------------------------------------------------------------- configs


def unet_config(family: str) -> dict[str, Any]:
    base = base_family(_check(family))
    heads = [heads_for(family, c) for c in UNET_CHANNELS]
    config: dict[str, Any] = {
        "sample_size": UNET_SAMPLE_SIZE,
        "in_channels": 9 if is_inpaint(family) else LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": UNET_CHANNELS,
        "layers_per_block": UNET_LAYERS_PER_BLOCK,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": NORM_GROUPS,
        "attention_head_dim": heads[0] if base == "sd1" else tuple(heads),
        "use_linear_projection": base != "sd1",
        # As in stabilityai/stable-diffusion-2-1 (768 px v-model).
        "upcast_attention": family == "sd2-v",
    }
    if family == REFINER:
        # As the real refiner: no attention at the first level, deeper transformers below it (real:
        # 4 blocks), conditioned on OpenCLIP bigG alone, and 5 size numbers (aesthetic score
        # instead of the target size) + the pooled text in the added embedding.
        config |= {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": SDXL_TE2_HIDDEN,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": REFINER_TIME_IDS * SDXL_TIME_EMBED_DIM + SDXL_TE2_HIDDEN,
        }
    elif base == "sdxl":
        config |= {
            "cross_attention_dim": TE_HIDDEN + SDXL_TE2_HIDDEN,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            # 6 size/crop numbers, each Fourier-embedded, plus the pooled text.
            "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_TE2_HIDDEN,
        }
    else:
        config["cross_attention_dim"] = TE_HIDDEN
    return config


def vae_architecture(latent_channels: int) -> dict[str, Any]:
    """The tiny VAE's shape, shared by SD's 4-channel VAE and the DiT families' 16-channel one."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        "up_block_types": ("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        "block_out_channels": VAE_CHANNELS,
        "layers_per_block": 2,
        "latent_channels": latent_channels,
        "norm_num_groups": NORM_GROUPS,
        "sample_size": UNET_SAMPLE_SIZE * 2 ** (len(VAE_CHANNELS) - 1),
    }


def vae_config(family: str) -> dict[str, Any]:
    _check(family)
    return {**vae_architecture(LATENT_CHANNELS), "scaling_factor": scaling_factor(family)}


def text_encoder_config(family: str, which: int = 1) -> CLIPTextConfig:
    """Config of text encoder ``which`` (1, or 2 for SDXL's OpenCLIP bigG)."""
    base = base_family(_check(family))
    if which == 2 and base != "sdxl":
        raise ValueError(f"{family} has a single text encoder")
    if which == 1 and family == REFINER:
        raise ValueError("the SDXL refiner has only OpenCLIP bigG (text encoder 2)")
    hidden = SDXL_TE2_HIDDEN if which == 2 else TE_HIDDEN
    # OpenAI CLIP (SD1, SDXL encoder 1) uses quick_gelu; OpenCLIP uses gelu.
    openclip = base == "sd2" or which == 2
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=TE_LAYERS,
        num_attention_heads=te_heads(hidden),
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=hidden,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=1,  # as in the hub's SD configs; CLIP never uses it
        layer_norm_eps=1e-5,
    )


def scheduler_config(family: str) -> dict[str, Any]:
    """The training noise schedule of every SD model, as the hub's configs give it."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type(family),
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def _scheduler(family: str) -> DDIMScheduler | EulerDiscreteScheduler:
    if base_family(family) == "sdxl":
        return EulerDiscreteScheduler(**scheduler_config(family))
    return DDIMScheduler(**scheduler_config(family), clip_sample=False, set_alpha_to_one=False)


# --------------------------------------------------------------------------- models


@torch.no_grad()
def _randomise_constants(module: torch.nn.Module) -> None:
    """Add noise to the vectors that init leaves constant (norm weights = 1,
    zero biases), so that a round-trip test also catches swapped norms and
    biases, not only swapped matrices. Matrices are always random."""
    for param in module.parameters():
        if param.ndim == 1 and bool((param == param[0]).all()):
            param.add_(torch.randn_like(param) * _SEED_NOISE)


def _build_unet(family: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**unet_config(family))
    _randomise_constants(unet)
    with torch.no_grad():
        # Small outputs, as a trained epsilon model's are: the loader's
        # A1111-style v-prediction probe must read a tiny eps model as eps.
        unet.conv_out.weight.mul_(_CONV_OUT_SCALE)
        unet.conv_out.bias.mul_(_CONV_OUT_SCALE)
    return unet.eval()


def _build_vae(family: str) -> AutoencoderKL:
    vae = AutoencoderKL(**vae_config(family))
    _randomise_constants(vae)
    return vae.eval()


def _build_text_encoder(family: str, which: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = text_encoder_config(family, which)
    model = CLIPTextModelWithProjection(config) if which == 2 else CLIPTextModel(config)
    _randomise_constants(model)
    return model.eval()


def tiny_components(family: str, seed: int = 0) -> dict[str, Any]:
    """Freshly built diffusers components of a tiny ``family`` model.

    Keys: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, and for SDXL
    ``text_encoder_2``, ``tokenizer_2``; plus ``prediction_type``. The refiner has no
    ``text_encoder`` / ``tokenizer`` (diffusers names its one encoder ``text_encoder_2``). The weights
    depend only on ``family`` and ``seed``; the global RNG is left untouched.
    """
    refiner = is_refiner(family)
    base = base_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components: dict[str, Any] = {"unet": _build_unet(family), "vae": _build_vae(family)}
        if not refiner:
            components["text_encoder"] = _build_text_encoder(family, 1)
        if base == "sdxl":
            components["text_encoder_2"] = _build_text_encoder(family, 2)
    if not refiner:
        components["tokenizer"] = make_clip_tokenizer(pad_token(family, 1))
    if base == "sdxl":
        components["tokenizer_2"] = make_clip_tokenizer(pad_token(family, 2))
    components["prediction_type"] = prediction_type(family)
    return components


# --------------------------------------------------------------------------- files


def _cast(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    # Integer buffers (position_ids) and counters keep their dtype.
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _save(path: Path, state_dict: dict[str, Tensor]) -> Path:
    """Write by suffix: safetensors, or a pickled ``.ckpt``/``.pt``/``.pth`` in the
    Lightning shape A1111 checkpoints have, restricted to tensors and plain
    values so that ``torch.load(weights_only=True)`` accepts it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        save_file(state_dict, str(path), metadata={"format": "pt"})
    elif suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": state_dict, "global_step": 0}, path)
    else:
        raise ValueError(f"unsupported suffix {path.suffix!r}: use .safetensors, .ckpt, .pt or .pth")
    return path


def make_checkpoint(
    path: str | Path,
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny single-file checkpoint in the original (A1111) layout.

    Pass ``components`` (from :func:`tiny_components`) to reuse built models;
    otherwise they are built from ``family`` and ``seed``.
    """
    components = components if components is not None else tiny_components(family, seed)
    state_dict = refiner_to_ldm(components) if is_refiner(family) else to_ldm_state_dict(components, family)
    return _save(Path(path), _cast(state_dict, dtype))


def refiner_to_ldm(components: Mapping[str, Any]) -> dict[str, Tensor]:
    """The SDXL refiner's single file as Stability AI ships it: the UNet and VAE under the usual
    prefixes, and OpenCLIP bigG as the conditioner's *first* embedder (``conditioner.embedders.0.model.``,
    where the base model keeps CLIP-L), with its ``text_projection`` for the pooled vector."""
    unet, vae = components["unet"], components["vae"]
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    out |= {VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()}
    out |= {REFINER_TE + k: v for k, v in open_clip_to_ldm(components["text_encoder_2"], sd2=False).items()}
    return out


def make_vae(
    path: str | Path,
    family: str = "sd1",
    seed: int = 0,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a standalone VAE file as they are shared (``*.vae.safetensors`` /
    ``.pt``): LDM names with no prefix, plus the EMA counters and the
    ``loss.logvar`` parameter that files cut from training checkpoints keep."""
    components = components if components is not None else tiny_components(family, seed)
    vae = components["vae"]
    state_dict = vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    state_dict |= {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
        "loss.logvar": torch.tensor(0.0),
    }
    return _save(Path(path), state_dict)


def pipeline_class(family: str) -> type:
    """The diffusers pipeline class a ``family`` folder is saved as."""
    sdxl = base_family(_check(family)) == "sdxl"
    if family == REFINER:
        return StableDiffusionXLImg2ImgPipeline
    if is_inpaint(family):
        return StableDiffusionXLInpaintPipeline if sdxl else StableDiffusionInpaintPipeline
    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def make_diffusers_folder(
    path: str | Path,
    family: str,
    seed: int = 0,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ``save_pretrained`` folder that loads offline with
    ``<Pipeline>.from_pretrained(path, local_files_only=True)`` and serves as
    the ``config=`` folder for ``from_single_file``."""
    components = components if components is not None else tiny_components(family, seed)
    path = Path(path)
    sdxl = base_family(family) == "sdxl"
    modules: dict[str, Any] = {
        name: components.get(name) for name in ("unet", "vae", "text_encoder", "tokenizer")
    }
    modules["scheduler"] = _scheduler(family)
    if sdxl:
        modules |= {name: components[name] for name in ("text_encoder_2", "tokenizer_2")}
    if family == REFINER:
        # as in stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json
        modules |= {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
    elif not sdxl:
        modules |= {"safety_checker": None, "requires_safety_checker": False}
    pipeline = pipeline_class(family)(**modules, feature_extractor=None, image_encoder=None)
    pipeline.save_pretrained(path, safe_serialization=True)

    # transformers 5 saves tokenizers as tokenizer.json only; write the classic
    # vocab/merges files of the hub's SD repos instead.
    for name, which in (("tokenizer", 1), ("tokenizer_2", 2)):
        if modules.get(name) is not None:
            shutil.rmtree(path / name)
            write_tokenizer_files(path / name, pad_token=pad_token(family, which))
    return path

