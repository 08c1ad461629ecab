"""CLIP encoding of prompts exactly the way A1111 feeds them to the model.

A1111's ``sd_hijack_clip`` rules, reproduced:
- the prompt is split into weighted pieces (``parse_attention``); each piece is tokenized and
  the tokens fill 75-token chunks, each wrapped in BOS/EOS and padded to 77; ``BREAK`` closes
  the current chunk; when a chunk fills up within 20 tokens after a comma, the tail after the
  comma moves to the next chunk (``comma_padding_backtrack``);
- textual-inversion embeddings are found by their name's token ids and take ``n_vectors``
  placeholder slots; their vectors replace the token embeddings at those slots;
- every chunk is encoded separately (clip skip: an earlier hidden layer, then the final layer
  norm for SD1/SD2; SDXL uses the penultimate layer of both encoders, the SDXL refiner that of its
  only one, OpenCLIP bigG), multiplied by the token
  weights and rescaled to keep its original mean ("Original" emphasis; A1111's ``emphasis``
  option picks "None", "Ignore" or "No norm" instead, see :func:`apply_emphasis`), and the chunks
  are concatenated; SDXL's pooled vector is bigG's (the second encoder, the refiner's only one),
  from the first chunk;
- after the first EOS, OpenCLIP encoders see their own pad id (0), CLIP-L sees EOS.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from studio.prompts.parser import DEFAULT_EMPHASIS, check_emphasis, emphasis_pieces

CHUNK = 75
COMMA_BACKTRACK = 20
CACHE_SIZE = 64


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (offset in chunk, Embedding)


@dataclass
class Conditioning:
    embeds: torch.Tensor            # [1, 77 * chunks, width]
    pooled: torch.Tensor | None     # [1, proj] for SDXL


class EmbeddingIndex:
    """Embeddings keyed by the first token id of their name, longest names first, so the
    token stream can be matched as A1111's ``find_embedding_at_position`` does."""

    def __init__(self, tokenizer, embeddings: dict[str, Any]):
        self.by_first: dict[int, list[tuple[tuple[int, ...], Any]]] = {}
        for name, emb in embeddings.items():
            ids = tuple(tokenizer(name, add_special_tokens=False)["input_ids"])
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for entries in self.by_first.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def match(self, tokens: list[int], pos: int) -> tuple[Any, int] | tuple[None, int]:
        for ids, emb in self.by_first.get(tokens[pos], ()):
            if tuple(tokens[pos:pos + len(ids)]) == ids:
                return emb, len(ids)
        return None, 0


def tokenize_prompt(tokenizer, text: str, index: EmbeddingIndex | None = None,
                    comma_backtrack: int = COMMA_BACKTRACK,
                    emphasis: str = DEFAULT_EMPHASIS) -> tuple[list[Chunk], int]:
    """Chunks of exactly 77 tokens (BOS + 75 + EOS) and the prompt's token count. ``emphasis``
    decides how brackets and weights are read (``parser.emphasis_pieces``)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    chunks: list[Chunk] = []
    chunk = Chunk()
    count = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal chunk, count, last_comma
        count += len(chunk.tokens) if is_last else CHUNK
        missing = CHUNK - len(chunk.tokens)
        chunk.tokens = [bos] + chunk.tokens + [eos] * missing + [eos]
        chunk.weights = [1.0] + chunk.weights + [1.0] * missing + [1.0]
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for piece, weight in emphasis_pieces(text, emphasis):
        if piece == "BREAK" and weight == -1:
            close()
            continue
        tokens = tokenizer(piece, add_special_tokens=False)["input_ids"]
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == CHUNK and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_weights = chunk.tokens[cut:], chunk.weights[cut:]
                moved_fixes = [(o - cut, e) for o, e in chunk.fixes if o >= cut]
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.fixes = [(o, e) for o, e in chunk.fixes if o < cut]
                close()
                chunk.tokens, chunk.weights, chunk.fixes = moved_tokens, moved_weights, moved_fixes
            if len(chunk.tokens) == CHUNK:
                close()
            emb, length = index.match(tokens, pos) if index else (None, 0)
            if emb is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            n = emb.n_vectors
            if len(chunk.tokens) + n > CHUNK:
                close()
            chunk.fixes.append((len(chunk.tokens), emb))
            chunk.tokens += [0] * n
            chunk.weights += [weight] * n
            pos += length
    if chunk.tokens or not chunks:
        close(is_last=True)
    return chunks, count


@contextlib.contextmanager
def _spliced(encoder, rows: list[list[tuple[int, torch.Tensor]]]):
    """Replace token embeddings at embedding slots (offset + 1 for BOS), A1111's
    ``EmbeddingsWithFixes``. CLIPTextModel takes only ids, so a forward hook does it."""
    if not any(rows):
        yield
        return
    module = getattr(encoder, "text_model", encoder).embeddings.token_embedding

    def hook(_module, _inputs, output):
        output = output.clone()
        for row, fixes in enumerate(rows):
            for offset, vec in fixes:
                n = min(output.shape[1] - offset - 1, vec.shape[0])
                output[row, offset + 1:offset + 1 + n] = vec[:n].to(output.dtype)
        return output

    handle = module.register_forward_hook(hook, prepend=True)  # other hooks see the spliced output
    try:
        yield
    finally:
        handle.remove()


class TextConditioner:
    """Owned by a loaded model: encodes prompts with its tokenizers and encoders, with the
    embeddings that fit it, and remembers recent results (a prompt encodes once)."""

    def __init__(self, model, embeddings: dict[str, Any] | None = None):
        self.model = model
        self.embeddings = embeddings or {}
        self.index = EmbeddingIndex(model.tokenizers[0], self.embeddings) if self.embeddings else None
        self._cache: OrderedDict[tuple, Conditioning] = OrderedDict()
        self._chunks: OrderedDict[tuple[str, str], tuple[list[Chunk], int]] = OrderedDict()
        # Which text-encoder weights are in force (LoRAs merged into them): part of the cache
        # key, so turning a LoRA on and off again still hits the cache.
        self.weights_key: tuple = ()

    def clear_cache(self) -> None:
        """Forget cached encodings: training changes text-encoder weights and embedding vectors in
        place, which the cache key cannot see."""
        self._cache.clear()

    def set_weights_key(self, key: tuple) -> None:
        self.weights_key = key

    def set_embeddings(self, embeddings: dict[str, Any]) -> None:
        self.embeddings = embeddings
        self.index = EmbeddingIndex(self.model.tokenizers[0], embeddings) if embeddings else None
        self._cache.clear()
        self._chunks.clear()

    def _tokenized(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> tuple[list[Chunk], int]:
        key = (text, emphasis)  # the modes differ in tokens ("None") or in weights ("Ignore")
        hit = self._chunks.get(key)
        if hit is None:
            hit = tokenize_prompt(self.model.tokenizers[0], text, self.index, emphasis=emphasis)
            self._chunks[key] = hit
            while len(self._chunks) > CACHE_SIZE:
                self._chunks.popitem(last=False)
        return hit

    def token_count(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> int:
        return self._tokenized(text, emphasis)[1]

    def chunks(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[Chunk]:
        return self._tokenized(text, emphasis)[0]

    def used_embeddings(self, text: str, emphasis: str = DEFAULT_EMPHASIS) -> list[Any]:
        seen: dict[str, Any] = {}
        for chunk in self.chunks(text, emphasis):
            for _, emb in chunk.fixes:
                seen.setdefault(emb.name, emb)
        return list(seen.values())

    def encode(self, text: str, clip_skip: int, min_chunks: int = 1,
               emphasis: str = DEFAULT_EMPHASIS) -> Conditioning:
        """``text``'s conditioning, padded to at least ``min_chunks`` chunks; ``emphasis`` is
        A1111's option ("None", "Ignore", "Original", "No norm"; see ``parser.EMPHASIS_MODES``)."""
        check_emphasis(emphasis)
        key = (text, clip_skip, min_chunks, emphasis, self.weights_key)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        result = self._encode(text, clip_skip, min_chunks, emphasis=emphasis)
        self._cache[key] = result
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def encode_for_training(self, texts: list[str], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of captions with autograd on and no cache (training): every caption is padded to
        the batch's largest chunk count. Returns ``(context [B, 77*k, D], pooled [B, D'] or None)``;
        gradients reach whatever learns (text-encoder LoRA layers, spliced embedding vectors)."""
        count = max(len(self.chunks(t)) for t in texts)
        encoded = [self._encode(t, clip_skip, count, grad=True) for t in texts]
        pooled = [c.pooled for c in encoded]
        return (torch.cat([c.embeds for c in encoded]),
                torch.cat(pooled) if all(p is not None for p in pooled) else None)

    def _encode(self, text: str, clip_skip: int, min_chunks: int, grad: bool = False,
                emphasis: str = DEFAULT_EMPHASIS) -> Conditioning:
        m = self.model
        chunks = list(self.chunks(text, emphasis))  # a copy: the padding below must not reach the cache
        while len(chunks) < min_chunks:
            chunks += tokenize_prompt(m.tokenizers[0], "")[0]
        device = m.policy.device
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32, device=device)
        parts, pooled = [], None
        with torch.enable_grad() if grad else torch.inference_mode():
            for index, (encoder, tokenizer) in enumerate(zip(m.text_encoders, m.tokenizers)):
                ids = torch.tensor([_pad_after_eos(c.tokens, tokenizer) for c in chunks], device=device)
                keys = _embedding_keys(m, index)
                rows = [[(o, vec.to(device)) for o, e in c.fixes if (vec := _vectors(e, keys)) is not None]
                        for c in chunks]
                with _spliced(encoder, rows):
                    out = encoder(ids, output_hidden_states=True)
                # a skip past the encoder's depth (12 is allowed; pruned and tiny encoders have fewer
                # layers) stops at its first layer rather than indexing out of range
                clip_skip = min(clip_skip, len(out.hidden_states) - (2 if m.is_sdxl else 1))
                if m.is_sdxl:
                    hidden = out.hidden_states[-(clip_skip + 1)]
                elif clip_skip > 1:
                    hidden = getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-clip_skip])
                else:
                    hidden = out.last_hidden_state
                hidden = apply_emphasis(hidden.float(), weights, emphasis)
                parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
                if getattr(out, "text_embeds", None) is not None:
                    pooled = out.text_embeds[:1].float()
        return Conditioning(torch.cat(parts, dim=-1), pooled)


def _embedding_keys(model, index: int) -> tuple[str, ...]:
    """Which vectors of an embedding file encoder ``index`` takes, in order of preference. The
    refiner's only encoder is SDXL's bigG: an SDXL file's ``clip_g`` part, or a single-encoder file
    of its width (A1111 takes a plain tensor for any encoder)."""
    if getattr(model, "is_refiner", False):
        return ("clip_g", "default")
    return (("clip_l", "clip_g")[index],) if model.is_sdxl else ("default",)


def _vectors(embedding, keys: tuple[str, ...]) -> torch.Tensor | None:
    for key in keys:
        if key in embedding.vectors:
            return embedding.vectors[key]
    return None


def _pad_after_eos(tokens: list[int], tokenizer) -> list[int]:
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if pad is None or pad == eos:
        return tokens
    first = tokens.index(eos)
    return tokens[:first + 1] + [pad] * (len(tokens) - first - 1)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str = DEFAULT_EMPHASIS) -> torch.Tensor:
    """A1111's ``Emphasis.after_transformers`` on encoder output ``z`` [chunks, 77, D] with token
    ``weights`` [chunks, 77]: "Original" scales each token by its weight, then restores the
    chunk's mean; "No norm" only scales. "None" and "Ignore" tokenized with weights 1.0, so
    nothing changes for them."""
    if mode in ("None", "Ignore") or bool((weights == 1.0).all()):
        return z
    scaled = z * weights[..., None]
    if mode == "No norm":
        return scaled
    return scaled * (z.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
