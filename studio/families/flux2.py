"""FLUX.2 Klein (4B, 9B; distilled and base): BFL's transformer through diffusers' converter (every width
from shapes), Qwen3's hidden states of layers 9, 18 and 27 stacked per token, FLUX.2's 32-channel VAE
from BFL's file, and the inputs ``Flux2KleinPipeline`` gives the transformer.

The sampler's latent space is the pipeline's: the VAE's latents patchified 2 x 2 into 128 channels at
1/16 of the image and normalised by the VAE's BatchNorm statistics, so the noise is drawn in that shape
as the pipeline draws it; :class:`Flux2LatentCodec` maps them to and from what the VAE takes.
The schedule is the pipeline's: linspace(1, 1/steps) shifted by BFL's empirical exponent, which
depends on the image's token count and the step count (``FlowShiftSpec.empirical_mu``).

CFG: the pipeline's ``guidance_scale`` is A1111's CFG scale (``neg + g (pos - neg)``), and, like
Forge, the negative pass runs only when it is not 1 (distilled Klein runs at 1). FLUX.2 dev (its
guidance input, a Mistral text encoder) is recognised and refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.dit_engine import DiTEngine
from studio.models.state_dict import ModelFileError, Shapes
from studio.prompts.dit_encode import Qwen3Conditioner
from studio.prompts.encode import Conditioning, apply_emphasis

# Flux2KleinPipeline's defaults: the prompt is padded (and cut) to 512 tokens, and the text input is
# these Qwen3 hidden states (0 = the embeddings), concatenated per token.
MAX_TOKENS = 512
TEXT_LAYERS = (9, 18, 27)
# The VAE latent's 2 x 2 patches are the sampler's (and the BatchNorm's) channels.
PATCH = 2
# BFL's VAE file keeps the quant convs inside the encoder and decoder; diffusers has them on top.
_NESTED_QUANT_CONVS = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
_BN = "bn."


# --------------------------------------------------------------------------- latents


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2]: each 2 x 2 patch's values as channels, channel-major."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    n, c, h, w = latents.shape
    x = latents.reshape(n, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // (PATCH * PATCH), h * PATCH, w * PATCH)


class Flux2LatentCodec:
    """The sampler's latents (patchified, normalised: [N, 128, H/16, W/16]) <-> the VAE's ([N, 32, H/8, W/8])."""

    def __init__(self, vae: Any):
        self.vae = vae

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._statistics(latents)
        return unpatchify(latents * std + mean)

    def from_vae(self, latents: torch.Tensor) -> torch.Tensor:
        patches = patchify(latents)
        mean, std = self._statistics(patches)
        return (patches - mean) / std


def build_flux2_vae(weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy, name: str) -> Any:
    """``AutoencoderKLFlux2`` from BFL's ``flux2-vae.safetensors`` (or one with top-level quant convs):
    SD's VAE names read by diffusers' LDM converter, the BatchNorm's statistics kept as they are."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from studio.models.dit_arch import flux2_vae_config
    from studio.models.dit_modules import assign, on_meta, shapes_of, strip

    bare = {_lifted(k): v for k, v in strip(weights, prefix).items()}
    config = flux2_vae_config(shapes_of(bare), "")
    converted = convert_ldm_vae_checkpoint({k: v for k, v in bare.items() if not k.startswith(_BN)}, config)
    converted |= {k: v for k, v in bare.items() if k.startswith(_BN)}
    # a training counter BFL's file leaves out; the BatchNorm is only ever used through its statistics
    converted.setdefault(_BN + "num_batches_tracked", torch.tensor(0))
    vae = assign(on_meta(lambda: AutoencoderKLFlux2.from_config(config)), converted, name)
    return vae.to(policy.vae_dtype).eval().requires_grad_(False)


def _lifted(key: str) -> str:
    for nested, top in _NESTED_QUANT_CONVS.items():
        if key.startswith(nested):
            return top + key[len(nested):]
    return key


# --------------------------------------------------------------------------- prompts and the transformer


class KleinConditioner(Qwen3Conditioner):
    """Prompts -> [1, 512, 3 x Qwen3 width]: the chat-templated prompt padded to 512 tokens (the
    pipeline feeds the padding's hidden states too), layers 9, 18 and 27 side by side per token."""

    thinking = False   # Flux2KleinPipeline renders the chat template with enable_thinking=False

    def __init__(self, model: Any):
        super().__init__(model)
        config = model.text_encoders[0].config
        width, layers = int(config.hidden_size), int(config.num_hidden_layers)
        expected = int(model.unet.config.joint_attention_dim)
        if width * len(TEXT_LAYERS) != expected or layers < max(TEXT_LAYERS):
            raise ModelFileError(
                f"the Qwen3 text encoder is {width} wide with {layers} layers; this FLUX.2 transformer reads "
                f"{expected // len(TEXT_LAYERS)}-wide text from layers {TEXT_LAYERS} (Klein 4B uses "
                "qwen_3_4b.safetensors, Klein 9B qwen_3_8b.safetensors)")

    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        from studio.models.qwen3_text import qwen3_prompt

        encoder, tokenizer = self.model.text_encoders[0], self.model.tokenizers[0]
        prompt = qwen3_prompt(tokenizer, text, MAX_TOKENS, self.thinking, emphasis)
        padding = MAX_TOKENS - len(prompt.ids)
        ids = torch.tensor([prompt.ids + [tokenizer.pad_token_id] * padding], device=self.device)
        mask = torch.tensor([[1] * len(prompt.ids) + [0] * padding], device=self.device)
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hidden = torch.cat([out.hidden_states[k] for k in TEXT_LAYERS], dim=-1).float()
        weights = torch.tensor([prompt.weights + [1.0] * padding], dtype=torch.float32, device=hidden.device)
        return Conditioning(apply_emphasis(hidden, weights, emphasis), None)


def image_ids(h: int, w: int, device: Any) -> torch.Tensor:
    """(time, row, column, sequence) position ids of the h x w latent tokens, row-major: [h * w, 4]."""
    ids = torch.zeros(h, w, 4, dtype=torch.long)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4).to(device)


def text_ids(length: int, device: Any) -> torch.Tensor:
    """Text tokens sit on the fourth (sequence) axis: [length, 4]."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


class Flux2Denoiser:
    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = bool(transformer.config.guidance_embeds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None or reference is not None:
            raise ValueError("FLUX.2 Klein's reference images are not supported yet")
        n, c, h, w = x.shape
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)                     # one token per latent cell
        timestep = t.expand(n).to(x.device, self.dtype) / 1000
        out = self.transformer(
            hidden_states=tokens.to(self.dtype), encoder_hidden_states=context.to(self.dtype), timestep=timestep,
            img_ids=image_ids(h, w, x.device), txt_ids=text_ids(context.shape[1], x.device), guidance=None,
            return_dict=False)[0]
        return out.float().permute(0, 2, 1).reshape(n, c, h, w)


# --------------------------------------------------------------------------- the engine


class Flux2Engine(DiTEngine):
    family_id = "flux2"

    def variant(self, shapes: Shapes, prefix: str, name: str) -> str:
        """"dev" has a guidance input; Klein's base model has exactly the distilled one's tensors: its file
        name says it (``flux-2-klein-base-4b``)."""
        if prefix + "guidance_in.in_layer.weight" in shapes:
            return "dev"
        return "base" if "base" in name.lower() else "distilled"

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        from diffusers import Flux2Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        from studio.models.dit_arch import flux2_transformer_config
        from studio.models.dit_modules import build_transformer, strip

        if self.variant(shapes, prefix, name) == "dev":
            raise ModelFileError(f"{name}: FLUX.2 dev needs the Mistral Small 3.1 text encoder, which this version "
                                 "of the studio cannot run yet; FLUX.2 Klein (Qwen3) runs")
        # diffusers' converter reads the block index at a fixed place in the name: no prefix
        converted = convert_flux2_transformer_checkpoint_to_diffusers(strip(weights, prefix))
        return build_transformer(Flux2Transformer2DModel, flux2_transformer_config(shapes, prefix), converted,
                                 policy, config_cache, name)

    def build_vae(self, weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy, name: str) -> Any:
        return build_flux2_vae(weights, prefix, policy, name)

    def build_text_encoder(self, kind: str, weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy,
                           name: str) -> tuple[Any, Any]:
        if kind != "qwen3":
            return super().build_text_encoder(kind, weights, prefix, policy, name)
        from studio.models.qwen3_text import qwen3_encoder_and_tokenizer

        return qwen3_encoder_and_tokenizer(weights, prefix, policy, name)

    def latent_codec(self, model: Any) -> Any:
        return Flux2LatentCodec(model.vae)

    def conditioner(self, model: Any) -> Any:
        return KleinConditioner(model)

    def denoiser(self, model: Any) -> Any:
        return Flux2Denoiser(model.unet, model.policy.dtype)


ENGINE = Flux2Engine()
