"""Prompt encoding for the DiT families: SD3/SD3.5 (CLIP-L + OpenCLIP bigG + T5-XXL) and FLUX.1
(CLIP-L pooled + T5-XXL), with the same inputs diffusers' pipelines give their transformers.

- T5 prompts are not cut into 75-token chunks: the whole prompt is one sequence of the family's
  length (256 tokens for SD3, 512 for FLUX.1), EOS-terminated and padded; past that it is truncated
  and the conditioner reports it.
- A1111 emphasis (``(word:1.2)``) applies to the CLIP parts as for SDXL, and to T5's tokens the way
  Forge does it (each piece tokenized on its own, the output scaled per token and, in "Original"
  mode, brought back to its mean). A prompt without brackets gives exactly diffusers' tokens.
- SD3: both CLIPs' penultimate layers (A1111's clip skip counts from there), concatenated,
  zero-padded to T5's width, followed by T5's sequence; the pooled vectors of both concatenated.
  Without a T5 file the T5 part is zeros, as in ``StableDiffusion3Pipeline``.
- FLUX.1: CLIP-L's pooled output and T5's last hidden state.

Textual-inversion embeddings are SD1/SD2/SDXL files; these conditioners hold none.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from studio.prompts.encode import CACHE_SIZE, Conditioning, _pad_after_eos, apply_emphasis, tokenize_prompt
from studio.prompts.parser import DEFAULT_EMPHASIS, check_emphasis, emphasis_pieces


@dataclass(frozen=True)
class T5Tokens:
    ids: list[int]
    weights: list[float]
    count: int          # the prompt's tokens before truncation (EOS not counted)
    limit: int          # tokens the sequence holds besides EOS


def t5_tokens(tokenizer: Any, text: str, max_length: int, emphasis: str = DEFAULT_EMPHASIS) -> T5Tokens:
    """The prompt's T5 ids and weights, ``max_length`` long: pieces tokenized on their own, EOS, pad."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in emphasis_pieces(text, emphasis):
        if piece == "BREAK" and weight == -1:
            continue  # a CLIP chunk break; T5 has no chunks
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += tokens
        weights += [weight] * len(tokens)
    count, limit = len(ids), max_length - 1
    ids, weights = ids[:limit] + [tokenizer.eos_token_id], weights[:limit] + [1.0]
    missing = max_length - len(ids)
    return T5Tokens(ids + [tokenizer.pad_token_id] * missing, weights + [1.0] * missing, count, limit)


def plain_text(text: str, emphasis: str = DEFAULT_EMPHASIS) -> str:
    """The prompt without attention syntax, for encoders that only give a pooled vector."""
    return "".join(piece for piece, weight in emphasis_pieces(text, emphasis)
                   if not (piece == "BREAK" and weight == -1))


class DiTConditioner:
    """What the conditioning plan and the doors ask of a text conditioner, for the DiT families:
    one "chunk" per prompt (the sequences have a fixed length), a cache keyed like the SD one."""

    def __init__(self, model: Any):
        self.model = model
        self.embeddings: dict[str, Any] = {}
        self.weights_key: tuple = ()
        self._cache: OrderedDict[tuple, Conditioning] = OrderedDict()

    # -- the interface shared with prompts.encode.TextConditioner -------------------------
    def clear_cache(self) -> None:
        self._cache.clear()

    def set_weights_key(self, key: tuple) -> None:
        self.weights_key = key

    def set_embeddings(self, embeddings: dict[str, Any]) -> None:
        self.embeddings = {}  # textual inversion is for the CLIP-only families

    def chunks(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[None]:
        return [None]

    def used_embeddings(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[Any]:
        return []

    @property
    def t5(self) -> tuple[Any, Any] | None:
        """(encoder, tokenizer) of T5, None when the model runs without one."""
        for encoder, tokenizer in zip(self.model.text_encoders, self.model.tokenizers):
            if getattr(encoder.config, "model_type", "") in ("t5", "umt5"):
                return encoder, tokenizer
        return None

    @property
    def t5_length(self) -> int:
        return self.model.spec.t5_max_tokens

    def token_count(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> int:
        """T5's count (what limits the prompt); the CLIP counts are in :meth:`token_counts`."""
        t5 = self.t5
        if t5 is None:
            return self.clip_count(text, emphasis)
        return t5_tokens(t5[1], text, self.t5_length, emphasis).count

    def clip_count(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> int:
        return tokenize_prompt(self.model.tokenizers[0], text, None, emphasis=emphasis)[1]

    def token_counts(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> dict[str, tuple[int, int]]:
        """Each encoder's (tokens, limit): {"clip": (n, 75), "t5": (n, 255)}."""
        counts = {"clip": (self.clip_count(text, emphasis), 75)}
        t5 = self.t5
        if t5 is not None:
            tokens = t5_tokens(t5[1], text, self.t5_length, emphasis)
            counts["t5"] = (tokens.count, tokens.limit)
        return counts

    def encode(self, text: str, clip_skip: int, min_chunks: int = 1,
               emphasis: str = DEFAULT_EMPHASIS) -> Conditioning:
        check_emphasis(emphasis)
        key = (text, clip_skip, emphasis, self.weights_key)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        with torch.inference_mode():
            result = self._encode(text, clip_skip, emphasis)
        self._cache[key] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        raise NotImplementedError

    # -- the encoders ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.policy.device

    def encode_t5(self, text: str, emphasis: str) -> torch.Tensor | None:
        t5 = self.t5
        if t5 is None:
            return None
        encoder, tokenizer = t5
        tokens = t5_tokens(tokenizer, text, self.t5_length, emphasis)
        ids = torch.tensor([tokens.ids], device=self.device)
        hidden = encoder(ids).last_hidden_state.float()
        weights = torch.tensor([tokens.weights], dtype=torch.float32, device=self.device)
        return apply_emphasis(hidden, weights, emphasis)

    def encode_clip(self, index: int, text: str, clip_skip: int, emphasis: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of the layer clip skip picks, with emphasis; pooled/projected vector) of
        the first 75 tokens, as diffusers truncates them."""
        encoder, tokenizer = self.model.text_encoders[index], self.model.tokenizers[index]
        chunk = tokenize_prompt(tokenizer, text, None, emphasis=emphasis)[0][0]
        ids = torch.tensor([_pad_after_eos(chunk.tokens, tokenizer)], device=self.device)
        out = encoder(ids, output_hidden_states=True)
        layers = len(out.hidden_states)
        hidden = out.hidden_states[-min(clip_skip + 1, layers - 1)].float()
        weights = torch.tensor([chunk.weights], dtype=torch.float32, device=self.device)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return apply_emphasis(hidden, weights, emphasis), pooled.float()


class SD3Conditioner(DiTConditioner):
    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        hidden_l, pooled_l = self.encode_clip(0, text, clip_skip, emphasis)
        hidden_g, pooled_g = self.encode_clip(1, text, clip_skip, emphasis)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        width = self.model.unet.config.joint_attention_dim
        t5 = self.encode_t5(text, emphasis)
        if t5 is None:
            t5 = torch.zeros(1, clip.shape[1], width, device=clip.device)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))


class FluxConditioner(DiTConditioner):
    def _encode(self, text: str, clip_skip: int, emphasis: str) -> Conditioning:
        encoder, tokenizer = self.model.text_encoders[0], self.model.tokenizers[0]
        ids = tokenizer(plain_text(text, emphasis), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        pooled = encoder(ids).pooler_output.float()
        t5 = self.encode_t5(text, emphasis)
        if t5 is None:
            raise ValueError("FLUX.1 needs its T5 text encoder")
        return Conditioning(t5, pooled)


class Qwen3Conditioner(DiTConditioner):
    """The families prompted through Qwen3's chat template (Z-Image, FLUX.2 Klein): one encoder, counted
    against the template-wrapped prompt's length. Subclasses say whether the template thinks and how the
    hidden states become the transformer's text."""

    max_tokens = 512
    thinking = True

    def token_count(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> int:
        return self.token_counts(text, emphasis)["qwen3"][0]

    def token_counts(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> dict[str, tuple[int, int]]:
        from studio.models.qwen3_text import qwen3_token_count

        return {"qwen3": qwen3_token_count(self.model.tokenizers[0], text, self.max_tokens, self.thinking, emphasis)}

