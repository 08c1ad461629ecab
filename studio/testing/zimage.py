"""Tiny random Z-Image (Turbo) models, and the Qwen3 text encoder it shares with FLUX.2 Klein,
in the layouts ComfyUI users keep them in.

Z-Image (Tongyi-MAI's Z-Image-Turbo, 6B) is a single-stream DiT: the caption goes through
``context_refiner`` blocks, the image patches through ``noise_refiner`` blocks (with
timestep modulation), then both, concatenated, through ``layers``. The single file
(Comfy-Org's ``z_image_turbo_bf16.safetensors``, ComfyUI's ``models/diffusion_models``) uses
ComfyUI's NextDiT names, which differ from diffusers' in five places:

* ``x_embedder`` / ``final_layer`` (diffusers: ``all_x_embedder.2-1`` / ``all_final_layer.2-1``,
  one per patch size; Z-Image has the one 2 x 2, 1-frame patch);
* ``layers.N.attention.qkv.weight``: q, k and v fused (diffusers: ``to_q``/``to_k``/``to_v``);
* ``attention.out`` (``to_out.0``), ``attention.q_norm`` / ``k_norm`` (``norm_q`` / ``norm_k``).

Everything else is named alike: ``t_embedder.mlp.{0,2}``, ``cap_embedder.{0,1}`` (an RMSNorm
over the text encoder's width, then a linear), ``x_pad_token`` / ``cap_pad_token``, the
blocks' ``feed_forward.w{1,2,3}``, ``attention_norm{1,2}``, ``ffn_norm{1,2}`` and
``adaLN_modulation.0`` (a bare linear: Lumina 2's, which shares the NextDiT names, is
``adaLN_modulation.1`` after a SiLU; diffusers and the studio tell the two apart by that).
Some files also carry Lumina 2's unused ``norm_final.weight``, which diffusers' converter
drops; these files don't.

The tiny transformer: 64 wide, 2 heads of 32 (real 3840, 30 x 128), RoPE axes (8, 12, 12)
(real (32, 48, 48)), 2 main layers (real 30), 2 + 2 refiner blocks (as real), 16 latent
channels (FLUX.1's AE). The modulation input is ``min(width, 256)`` wide, so 64 here (real
256); the timestep MLP keeps diffusers' fixed 1024-wide middle.

The text encoder is Qwen3-4B's decoder stack: Z-Image feeds its second-to-last hidden state
(``hidden_states[-2]``) to ``cap_embedder``. The tiny Qwen3 keeps the real 151,936-token
vocabulary (the Qwen3 tokenizer's ids reach 151,668), the 36 layers (so that FLUX.2 Klein's
layers 9, 18 and 27 exist), grouped-query attention with a head width unrelated to the model
width (real 32 x 128 queries, 8 key/value heads, 2560 wide; tiny 4 x 16, 2 key/value heads,
32 wide) and tied input/output embeddings, as Qwen3-4B. ComfyUI's
``models/text_encoders/qwen_3_4b.safetensors`` holds transformers' ``Qwen3ForCausalLM`` names
without ``lm_head`` (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_norm.weight``,
``model.norm.weight``): :func:`make_qwen3`.

Files: :func:`make_zimage_transformer`, :func:`make_qwen3`; the VAE is FLUX.1's
``ae.safetensors`` (:func:`studio.testing.flux.make_flux_vae` writes it from these
components). diffusers 0.42 loads the transformer file exactly with
``ZImageTransformer2DModel.from_single_file`` (no width is hard-coded) and calls it
"z-image-turbo".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ZImageTransformer2DModel
from torch import Tensor
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from studio.testing.dit_parts import (
    LATENT_CHANNELS_16,
    Rule,
    build_vae16,
    cast,
    prefixed,
    randomised,
    save_safetensors,
    seeded,
    tensor,
    to_original,
    vae16_config,
    write_json,
)

ZIMAGE_WIDTH = 64
ZIMAGE_HEADS = 2
ZIMAGE_LAYERS = 2
ZIMAGE_REFINER_LAYERS = 2
ZIMAGE_ROPE_AXES = (8, 12, 12)
# One patch size: 2 x 2 pixels of the latent, 1 frame ("2-1" in diffusers' module names).
ZIMAGE_PATCH = 2

QWEN3_VOCAB_SIZE = 151936
QWEN3_HIDDEN = 32
QWEN3_LAYERS = 36
QWEN3_HEADS = 4
QWEN3_KV_HEADS = 2
QWEN3_HEAD_DIM = 16
QWEN3_INTERMEDIATE = 64
# What ComfyUI's Qwen3 text encoder files hold: the decoder stack, no lm_head.
QWEN3_PREFIX = "model."


# --------------------------------------------------------------------------- Qwen3


def qwen3_config() -> Qwen3Config:
    """Qwen3-4B's text model (rope theta 1e6, RMS eps 1e-6, 40,960 positions, tied
    embeddings) at tiny width."""
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=QWEN3_HIDDEN,
        intermediate_size=QWEN3_INTERMEDIATE,
        num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=QWEN3_HEADS,
        num_key_value_heads=QWEN3_KV_HEADS,
        head_dim=QWEN3_HEAD_DIM,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_cache=False,
    )


def build_qwen3(causal_lm: bool = False) -> Qwen3Model | Qwen3ForCausalLM:
    """The tiny Qwen3: ``Qwen3Model`` (what Z-Image needs; diffusers' own Z-Image tests use it)
    or, with ``causal_lm``, ``Qwen3ForCausalLM`` (FLUX.2 Klein's declared type, whose tied
    ``lm_head`` is the token embedding). Both give the same hidden states for the same
    weights."""
    model_class = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return randomised(model_class(qwen3_config()))


def qwen3_state_dict(model: Qwen3Model | Qwen3ForCausalLM) -> dict[str, Tensor]:
    """ComfyUI's Qwen3 layout: ``model.`` + transformers' ``Qwen3Model`` names, no ``lm_head``
    (tied to the embedding in Qwen3-4B, and unused by image models)."""
    text_model = model.model if isinstance(model, Qwen3ForCausalLM) else model
    return {QWEN3_PREFIX + k: tensor(v) for k, v in text_model.state_dict().items()}


def make_qwen3(
    path: str | Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write ComfyUI's ``models/text_encoders/qwen_3_4b.safetensors`` (Z-Image, FLUX.2 Klein 4B;
    Klein 9B's ``qwen_3_8b`` has the same names): the tiny Qwen3 in bf16, named as in
    :func:`qwen3_state_dict`. ``components`` may come from :func:`tiny_zimage_components` or
    :func:`studio.testing.flux2.tiny_flux2_klein_components`."""
    model = components["text_encoder"] if components is not None else seeded(seed, build_qwen3)
    return save_safetensors(path, cast(qwen3_state_dict(model), dtype))


def write_qwen3_config(path: str | Path, causal_lm: bool = False) -> Path:
    """Write the tiny Qwen3's ``config.json`` into folder ``path`` (``architectures`` names
    ``Qwen3ForCausalLM`` with ``causal_lm``, else ``Qwen3Model``)."""
    config = qwen3_config()
    config.architectures = ["Qwen3ForCausalLM" if causal_lm else "Qwen3Model"]
    config.save_pretrained(path)
    return Path(path)


# --------------------------------------------------------------------------- transformer


def zimage_transformer_config() -> dict[str, Any]:
    """diffusers ``ZImageTransformer2DModel`` config of the tiny model."""
    return {
        "all_patch_size": (ZIMAGE_PATCH,),
        "all_f_patch_size": (1,),
        "in_channels": LATENT_CHANNELS_16,
        "dim": ZIMAGE_WIDTH,
        "n_layers": ZIMAGE_LAYERS,
        "n_refiner_layers": ZIMAGE_REFINER_LAYERS,
        "n_heads": ZIMAGE_HEADS,
        "n_kv_heads": ZIMAGE_HEADS,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": QWEN3_HIDDEN,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": list(ZIMAGE_ROPE_AXES),
        "axes_lens": [1024, 512, 512],
    }


def tiny_zimage_components(seed: int = 0) -> dict[str, Any]:
    """Freshly built modules of a tiny Z-Image, named as in diffusers' ``ZImagePipeline``:
    ``transformer``, ``vae`` (FLUX.1's 16-channel AE) and ``text_encoder`` (Qwen3, as
    ``Qwen3Model``; the pipeline's ``tokenizer`` is
    :func:`studio.models.bundled_tokenizers.qwen3_tokenizer`). Weights depend only on
    ``seed``; the global RNG is left untouched."""

    def build() -> dict[str, Any]:
        return {
            "transformer": _build_transformer(),  # first: make_zimage_transformer(seed=) builds it alone
            "vae": build_vae16("flux"),
            "text_encoder": build_qwen3(),
        }

    return seeded(seed, build)


def _build_transformer() -> ZImageTransformer2DModel:
    return randomised(ZImageTransformer2DModel(**zimage_transformer_config()))


_BLOCK = r"(layers|noise_refiner|context_refiner)\.(\d+)\."
_PATCH = rf"{ZIMAGE_PATCH}-1"

_ZIMAGE_RULES: list[Rule] = [
    (rf"all_x_embedder\.{_PATCH}\.(weight|bias)", r"x_embedder.\1"),
    (rf"all_final_layer\.{_PATCH}\.(.+)", r"final_layer.\1"),
    *[(_BLOCK + rf"attention\.to_{x}\.weight", rf"\1.\2.attention.qkv.weight#{i}/3") for i, x in enumerate("qkv")],
    (_BLOCK + r"attention\.to_out\.0\.weight", r"\1.\2.attention.out.weight"),
    (_BLOCK + r"attention\.norm_q\.weight", r"\1.\2.attention.q_norm.weight"),
    (_BLOCK + r"attention\.norm_k\.weight", r"\1.\2.attention.k_norm.weight"),
    # named alike in both
    (_BLOCK + r"(feed_forward\.w[123]\.weight|(attention|ffn)_norm[12]\.weight|adaLN_modulation\.0\.(weight|bias))",
     r"\1.\2.\3"),
    (r"(t_embedder\.mlp\.[02]\.(weight|bias)|cap_embedder\.(0\.weight|1\.weight|1\.bias))", r"\1"),
    (r"(x_pad_token|cap_pad_token)", r"\1"),
]


def zimage_transformer_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``ZImageTransformer2DModel`` weights -> ComfyUI's NextDiT names, without
    prefix; q/k/v fused. Raises on any key no rule covers."""
    return to_original(state_dict, _ZIMAGE_RULES)


def make_zimage_transformer(
    path: str | Path,
    seed: int = 0,
    *,
    prefix: str = "",
    dtype: torch.dtype = torch.bfloat16,
    components: Mapping[str, Any] | None = None,
) -> Path:
    """Write the transformer as Comfy-Org's ``z_image_turbo_bf16.safetensors`` (ComfyUI's
    ``models/diffusion_models``: bf16, no prefix); ``prefix="model.diffusion_model."`` gives
    files cut from a ComfyUI checkpoint. Without ``components`` it writes the transformer
    ``tiny_zimage_components(seed)`` holds."""
    transformer = components["transformer"] if components is not None else seeded(seed, _build_transformer)
    state_dict = zimage_transformer_to_original(transformer.state_dict())
    return save_safetensors(path, cast(prefixed(prefix, state_dict), dtype))


def write_zimage_configs(path: str | Path) -> Path:
    """Write the diffusers configs of the tiny model in the folder layout of
    ``Tongyi-MAI/Z-Image-Turbo``: ``transformer/``, ``vae/``, ``text_encoder/`` (Qwen3), each
    with a ``config.json``: the ``config=`` (plus ``subfolder=``) of diffusers' offline
    ``from_single_file`` calls and of transformers' ``from_pretrained``."""
    path = Path(path)
    write_json(path / "transformer" / "config.json",
               {"_class_name": "ZImageTransformer2DModel", **zimage_transformer_config()})
    write_json(path / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae16_config("flux")})
    write_qwen3_config(path / "text_encoder")
    return path
