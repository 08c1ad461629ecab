"""Chroma (lodestones' Chroma1-HD / -Base / -Flash): FLUX.1 schnell with its per-block modulation
pruned into one timestep MLP (the ``distilled_guidance_layer``) and CLIP-L gone. Its parts: the
transformer (widths from shapes, our key renaming), T5-XXL alone, FLUX.1's VAE (``ae.safetensors``),
FLUX.1's 2x2-packed latents and position ids; no pooled vector and no distilled guidance input, so
CFG is real CFG with the negative prompt, as in diffusers' ``ChromaPipeline``.

What Chroma adds over FLUX.1 is a text attention mask, built as ``ChromaPipeline`` builds it: T5
encodes the padded prompt with the tokenizer's mask (the prompt's tokens and EOS), and the
transformer sees those tokens and the first pad token only; the other pads are masked out of every
attention, in both directions. Such a pad token neither reads nor is read by anything else, so the
denoiser leaves it out of the sequence instead of masking it: the same image, a shorter sequence,
and no fully masked attention row (which some attention kernels turn into NaN).

diffusers 0.42 hands the transformer that mask as 0/1 floats, which scaled_dot_product_attention
adds to the logits instead of masking with them (diffusers issue #12116, fixed by #12263, undone by
#12508): its plain call lets every pad token in with a weight of 1/e, which spoils short prompts.
Given the mask as booleans, ``ChromaPipeline`` gives the studio's images (tests/test_chroma_engine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.families.dit_engine import DiTEngine
from studio.generation.dit_denoisers import image_ids, pack_latents, unpack_latents
from studio.models.state_dict import Shapes
from studio.prompts.dit_encode import DiTConditioner, t5_tokens
from studio.prompts.encode import Conditioning, apply_emphasis
from studio.prompts.parser import DEFAULT_EMPHASIS

# Pad tokens past the prompt's EOS that the transformer still sees (ChromaPipeline: one).
CHROMA_VISIBLE_PADS = 1


def text_masks(kept: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5's mask, the transformer's text mask), each [1, length], for a sequence whose first
    ``kept`` tokens are the prompt and its EOS: the transformer also sees the first pad token(s)."""
    positions = torch.arange(length)[None]
    return (positions < kept).long(), (positions < kept + CHROMA_VISIBLE_PADS).float()


class ChromaConditioner(DiTConditioner):
    """T5's last hidden state and the text mask. Chroma has no pooled vector: its ``Conditioning``
    carries the mask [1, L] in that place, which the flow loop stacks, repeats and slices exactly
    as the sequence it belongs to, and hands to :class:`ChromaDenoiser` as ``pooled``."""

    def token_counts(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> dict[str, tuple[int, int]]:
        """T5's (tokens, limit) only: Chroma has no CLIP."""
        tokens = t5_tokens(self._t5()[1], text, self.t5_length, emphasis)
        return {"t5": (tokens.count, tokens.limit)}

    def clip_count(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> int:
        return self.token_counts(text, emphasis)["t5"][0]

    def _t5(self) -> tuple[Any, Any]:
        t5 = self.t5
        if t5 is None:
            raise ValueError("Chroma needs its T5 text encoder")
        return t5

    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        encoder, tokenizer = self._t5()
        tokens = t5_tokens(tokenizer, text, self.t5_length, emphasis)
        kept = min(tokens.count, tokens.limit) + 1   # the prompt's tokens and EOS
        t5_mask, seen = text_masks(kept, len(tokens.ids))
        ids = torch.tensor([tokens.ids], device=self.device)
        hidden = encoder(ids, attention_mask=t5_mask.to(self.device)).last_hidden_state.float()
        weights = torch.tensor([tokens.weights], dtype=torch.float32, device=self.device)
        return Conditioning(apply_emphasis(hidden, weights, emphasis), seen.to(self.device))


class ChromaDenoiser:
    """FLUX.1's packing and position ids; the timestep alone drives the modulation (no guidance, no
    pooled vector); ``pooled`` is the text mask of :class:`ChromaConditioner` (None: all seen)."""

    def __init__(self, transformer: Any, dtype: torch.dtype):
        self.transformer, self.dtype = transformer, dtype
        self.has_guidance = False

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
                 guidance: float | None, extra: torch.Tensor | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        if extra is not None or reference is not None:
            raise ValueError("Chroma has no image-conditioned variant (FLUX.1 Fill / Kontext inputs)")
        n, _, h, w = x.shape
        tokens = pack_latents(x)
        if pooled is None:
            return unpack_latents(self._run(tokens, t, context, h, w), h, w)
        # the mask shows a prefix of each sequence; rows seeing as many tokens run together
        seen = pooled.sum(dim=1).round().long().tolist()
        out = torch.empty_like(tokens, dtype=torch.float32)
        for length in dict.fromkeys(seen):
            rows = torch.tensor([i for i in range(n) if seen[i] == length], device=x.device)
            out[rows] = self._run(tokens[rows], t, context[rows, :length], h, w)
        return unpack_latents(out, h, w)

    def _run(self, tokens: torch.Tensor, t: torch.Tensor, context: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, device = tokens.shape[0], tokens.device
        return self.transformer(
            hidden_states=tokens.to(self.dtype), timestep=(t.expand(n).to(device) / 1000).to(self.dtype),
            encoder_hidden_states=context.to(self.dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=self.dtype),
            img_ids=image_ids(h, w, device, self.dtype), return_dict=False)[0].float()


class ChromaEngine(DiTEngine):
    family_id = "chroma"
    vae_family = "flux"

    def build_transformer(self, weights: dict[str, torch.Tensor], shapes: Shapes, prefix: str,
                          policy: DevicePolicy, config_cache: Path, name: str) -> Any:
        from diffusers import ChromaTransformer2DModel

        from studio.models.chroma_keys import chroma_to_diffusers
        from studio.models.dit_arch import chroma_transformer_config
        from studio.models.dit_modules import build_transformer

        return build_transformer(ChromaTransformer2DModel, chroma_transformer_config(shapes, prefix),
                                 chroma_to_diffusers(weights, prefix), policy, config_cache, name)

    def conditioner(self, model: Any) -> Any:
        return ChromaConditioner(model)

    def denoiser(self, model: Any) -> Any:
        return ChromaDenoiser(model.unet, model.policy.dtype)


ENGINE = ChromaEngine()
