"""Z-Image (Tongyi-MAI's Turbo and base): ComfyUI's NextDiT-named transformer through diffusers'
converter (every width from shapes), Qwen3-4B's second-to-last hidden state of the chat-templated
prompt, FLUX.1's VAE, and the single-stream transformer's own calling convention -- a list of
latents and a list of unpadded captions, time running from 0 (noise) to 1, and the velocity negated
-- with the inputs ``ZImagePipeline`` gives it.

Classifier-free guidance: the pipeline's ``guidance_scale`` g gives ``pos + g (pos - neg)``, which is
A1111's CFG scale ``g + 1`` (Turbo runs at 0, i.e. CFG 1: no negative pass). The pipeline's CFG
truncation and normalisation are off by default and not offered.
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

# ZImagePipeline's max_sequence_length: the chat-templated prompt is cut there.
MAX_TOKENS = 512
# The caption is the text encoder's second-to-last hidden state.
HIDDEN_LAYER = -2


class ZImageConditioner(Qwen3Conditioner):
    """Prompts -> Qwen3 hidden states of the valid tokens only (the transformer pads captions itself).

    The plan stacks every text's conditioning into one tensor, so each is zero-padded to
    ``MAX_TOKENS`` here and its true length travels in the ``pooled`` slot ([1, 1]), which the
    sampling loop batches alongside; :class:`ZImageDenoiser` cuts the padding off again.
    """

    thinking = True   # ZImagePipeline renders the chat template with enable_thinking=True

    def __init__(self, model: Any):
        super().__init__(model)
        width = int(model.text_encoders[0].config.hidden_size)
        expected = int(model.unet.config.cap_feat_dim)
        if width != expected:
            raise ModelFileError(f"the Qwen3 text encoder is {width} wide; this {model.spec.label} transformer "
                                 f"reads {expected}-wide text (Z-Image uses Qwen3-4B: qwen_3_4b.safetensors)")

    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        from studio.models.qwen3_text import qwen3_prompt

        encoder, tokenizer = self.model.text_encoders[0], self.model.tokenizers[0]
        prompt = qwen3_prompt(tokenizer, text, MAX_TOKENS, self.thinking, emphasis)
        # Causal attention: without the pipeline's right padding the valid tokens' states are the same.
        ids = torch.tensor([prompt.ids], device=self.device)
        hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states[HIDDEN_LAYER].float()
        weights = torch.tensor([prompt.weights], dtype=torch.float32, device=hidden.device)
        hidden = apply_emphasis(hidden, weights, emphasis)
        length = hidden.shape[1]
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, MAX_TOKENS - length))
        return Conditioning(padded, torch.tensor([[float(length)]], device=hidden.device))


class ZImageDenoiser:
    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, lengths: torch.Tensor,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None or reference is not None:
            raise ValueError("Z-Image takes no extra image inputs")
        n = x.shape[0]
        latents = list(x.to(self.dtype).unsqueeze(2).unbind(0))          # [C, 1 frame, h, w] each
        counts = lengths[:, 0].round().long().tolist()
        captions = [context[i, :counts[i]].to(self.dtype) for i in range(n)]
        timestep = (1000 - t.expand(n).to(x.device)) / 1000             # Z-Image's time: 0 = noise
        out = self.transformer(latents, timestep, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)


def _dequantized_pad_tokens(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF files may quantize the learned pad tokens (``x_pad_token``, ``cap_pad_token``: [1, width]),
    but only linear layers compute from quantized data: those tensors are dequantized once, here."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from studio.models.storage import is_quantized

    return {k: dequantize_gguf_tensor(v) if is_quantized(v) and not k.endswith(".weight") else v
            for k, v in weights.items()}


class ZImageEngine(DiTEngine):
    family_id = "zimage"
    vae_family = "flux"

    def variant(self, shapes: Shapes, prefix: str, name: str) -> str:
        """Turbo has exactly the base model's tensors: its file name says it."""
        return "turbo" if "turbo" in name.lower() else "base"

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        from diffusers import ZImageTransformer2DModel
        from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

        from studio.models.dit_arch import zimage_transformer_config
        from studio.models.dit_modules import build_transformer, strip

        converted = _dequantized_pad_tokens(convert_z_image_transformer_checkpoint_to_diffusers(strip(weights, prefix)))
        return build_transformer(ZImageTransformer2DModel, zimage_transformer_config(shapes, prefix), converted,
                                 policy, config_cache, name)

    def build_text_encoder(self, kind: str, weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy,
                           name: str) -> tuple[Any, Any]:
        if kind != "qwen3":
            return super().build_text_encoder(kind, weights, prefix, policy, name)
        from studio.models.qwen3_text import qwen3_encoder_and_tokenizer

        return qwen3_encoder_and_tokenizer(weights, prefix, policy, name)

    def conditioner(self, model: Any) -> Any:
        return ZImageConditioner(model)

    def denoiser(self, model: Any) -> Any:
        return ZImageDenoiser(model.unet, model.policy.dtype)


ENGINE = ZImageEngine()
