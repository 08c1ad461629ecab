"""CLIP encoding of prompts the way A1111 feeds them to the model.

Prompts longer than 75 tokens are split into 75-token chunks, each wrapped in BOS/EOS
and padded to 77, encoded separately and concatenated along the sequence axis; the
negative prompt is padded with empty chunks to the same length. Clip skip picks an
earlier hidden layer (then the final layer norm, as A1111 does for SD1/SD2). SDXL
concatenates both encoders' penultimate-layer states and takes the pooled output of the
second encoder's first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 75


@dataclass
class Conditioning:
    embeds: torch.Tensor            # [batch, 77 * chunks, width]
    pooled: torch.Tensor | None     # [batch, proj] for SDXL


def chunk_ids(tokenizer, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return [[bos, *c, eos] + [pad] * (CHUNK - len(c)) for c in chunks]


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def _encode_chunk(encoder, ids: torch.Tensor, layer_from_end: int, final_norm: bool):
    out = encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-layer_from_end]
    if final_norm and layer_from_end > 1:
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    elif final_norm:
        hidden = out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    return hidden, pooled


def encode_texts(model, texts: list[str], clip_skip: int, min_chunks: int = 1) -> Conditioning:
    """Encode each distinct text once; rows follow ``texts``."""
    device = model.policy.device
    unique = list(dict.fromkeys(texts))
    per_text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    chunk_lists = {t: [chunk_ids(tok, t) for tok in model.tokenizers] for t in unique}
    n_chunks = max([min_chunks] + [len(c[0]) for c in chunk_lists.values()])
    with torch.inference_mode():
        for text in unique:
            parts, pooled = [], None
            for enc_index, (encoder, chunks) in enumerate(zip(model.text_encoders, chunk_lists[text])):
                empty = chunk_ids(model.tokenizers[enc_index], "")[0]
                chunks = chunks + [empty] * (n_chunks - len(chunks))
                ids = torch.tensor(chunks, device=device)
                if model.is_sdxl:
                    hidden, pool = _encode_chunk(encoder, ids, clip_skip + 1, final_norm=False)
                else:
                    hidden, pool = _encode_chunk(encoder, ids, clip_skip, final_norm=True)
                parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
                if pool is not None:
                    pooled = pool[:1]
            per_text[text] = (torch.cat(parts, dim=-1), pooled)
    embeds = torch.cat([per_text[t][0] for t in texts])
    pooled = None
    if model.is_sdxl:
        pooled = torch.cat([per_text[t][1] for t in texts])
    return Conditioning(embeds, pooled)


def encode_pair(model, prompts: list[str], negatives: list[str], clip_skip: int) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditioning with equal chunk counts so they batch together."""
    tok = model.tokenizers[0]
    chunks = max(len(chunk_ids(tok, t)) for t in [*prompts, *negatives])
    return (encode_texts(model, prompts, clip_skip, chunks), encode_texts(model, negatives, clip_skip, chunks))
