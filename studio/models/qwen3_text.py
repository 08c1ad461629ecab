"""Qwen3 text encoders (Z-Image: Qwen3-4B; FLUX.2 Klein: Qwen3-4B or -8B) from the files ComfyUI
users keep in ``models/text_encoders`` (``qwen_3_4b.safetensors``, ``qwen_3_8b.safetensors``), and the
chat-templated prompts both pipelines feed them.

The files hold transformers' ``Qwen3ForCausalLM`` names, usually without ``lm_head``
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_norm.weight``, ``model.norm.weight``).
Only hidden states are read, so a ``Qwen3Model`` is built: its config comes from the shapes, and what
no shape carries (RoPE base, norm epsilon, context length) follows Qwen3's published configs.

Prompts: both pipelines wrap the prompt in Qwen3's chat template (a user turn and the opening of the
assistant's). A1111 emphasis (``(word:1.2)``) tokenizes each piece on its own between the template's
two halves and scales the pieces' hidden states, as Forge does for T5; a prompt without brackets is
tokenized in one go, exactly as the pipelines do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from studio.devices import DevicePolicy
from studio.models.dit_modules import assign, finish, has_quantized, on_meta, shapes_of, strip
from studio.models.state_dict import ModelFileError, Shapes
from studio.prompts.parser import DEFAULT_EMPHASIS, emphasis_pieces

# Qwen3-4B's / -8B's config.json: none of these is in a shape.
QWEN3_ROPE_THETA = 1_000_000.0
QWEN3_RMS_EPS = 1e-6
QWEN3_MAX_POSITIONS = 40960
# ComfyUI's files keep the causal LM's "model." in front of the decoder stack's names.
_CAUSAL_LM_PREFIX = "model."
_LM_HEAD = "lm_head."
# Stands for the prompt while the chat template is rendered (a private-use character no prompt has).
_PROMPT_MARK = "\ue000"


def _shape(shapes: Shapes, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ModelFileError(f"tensor {name!r} missing: not a Qwen3 text encoder")
    return shapes[name]


def _layer_count(shapes: Shapes, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def qwen3_text_config(shapes: Shapes, prefix: str = "") -> dict[str, Any]:
    """Keyword arguments of ``transformers.Qwen3Config`` for a ``Qwen3Model`` stored in transformers'
    names under ``prefix`` (``embed_tokens.weight``, ``layers.N.self_attn.q_proj.weight``, ...)."""
    vocab, hidden = _shape(shapes, prefix + "embed_tokens.weight")
    attention = prefix + "layers.0.self_attn."
    head_dim = _shape(shapes, attention + "q_norm.weight")[0]
    heads, rest = divmod(_shape(shapes, attention + "q_proj.weight")[0], head_dim)
    kv_heads, kv_rest = divmod(_shape(shapes, attention + "k_proj.weight")[0], head_dim)
    if rest or kv_rest or heads % kv_heads:
        raise ModelFileError(f"Qwen3 attention widths do not fit {head_dim}-wide heads")
    layers = _layer_count(shapes, prefix)
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(shapes, prefix + "layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": QWEN3_MAX_POSITIONS,
        "rope_theta": QWEN3_ROPE_THETA,
        "rms_norm_eps": QWEN3_RMS_EPS,
        "attention_bias": attention + "q_proj.bias" in shapes,
        "max_window_layers": layers,
        "tie_word_embeddings": True,   # no lm_head is built; nothing to untie
        "use_cache": False,
    }


def _decoder_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``Qwen3Model`` names: the causal LM's ``model.`` dropped, its ``lm_head`` left out."""
    if not any(k.startswith(_CAUSAL_LM_PREFIX + "embed_tokens.") for k in weights):
        return {k: v for k, v in weights.items() if not k.startswith(_LM_HEAD)}
    return {k[len(_CAUSAL_LM_PREFIX):]: v for k, v in weights.items() if k.startswith(_CAUSAL_LM_PREFIX)}


def build_qwen3_text_encoder(weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy,
                             name: str) -> Any:
    """A ``transformers.Qwen3Model`` holding the file's tensors as they are (fp8/bf16 kept as stored,
    computed in the policy's dtype)."""
    from transformers import Qwen3Config, Qwen3Model

    bare = _decoder_names(strip(weights, prefix))
    if has_quantized(bare) or "token_embd.weight" in bare:
        raise ModelFileError(f"{name}: GGUF Qwen3 text encoders are not supported yet; use a .safetensors one "
                             "(qwen_3_4b.safetensors, or its fp8 version)")
    config = Qwen3Config(**qwen3_text_config(shapes_of(bare), ""))
    model = assign(on_meta(lambda: Qwen3Model(config)), bare, name)
    return finish(model, policy.dtype)


def qwen3_encoder_and_tokenizer(weights: dict[str, torch.Tensor], prefix: str, policy: DevicePolicy,
                                name: str) -> tuple[Any, Any]:
    from studio.models.bundled_tokenizers import qwen3_tokenizer

    return build_qwen3_text_encoder(weights, prefix, policy, name), qwen3_tokenizer()


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Qwen3Prompt:
    ids: list[int]          # the chat-templated prompt's ids, cut at max_length (not padded)
    weights: list[float]    # each id's emphasis (1.0 for the template's)
    count: int              # the prompt's own tokens
    limit: int              # prompt tokens that fit beside the template


def _template_halves(tokenizer: Any, thinking: bool) -> tuple[str, str]:
    """The chat template's text before and after the user's prompt (Z-Image renders it with Qwen3's
    thinking switch on, which adds nothing; Klein with it off, which adds an empty think block)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT_MARK}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    before, found, after = text.partition(_PROMPT_MARK)
    if not found:
        raise ValueError("the Qwen3 chat template lost the prompt")
    return before, after


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _spaces_forward(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Each piece's trailing whitespace moved to the start of the next: Qwen's byte-level BPE reads a
    word with the space before it (" red"), so "a (red:1.5) cube" gives the same tokens as "a red cube"."""
    moved: list[tuple[str, float]] = []
    carry = ""
    for piece, weight in pieces:
        text = carry + piece
        stripped = text.rstrip()
        carry = text[len(stripped):]
        if stripped:
            moved.append((stripped, weight))
    if carry and moved:
        moved[-1] = (moved[-1][0] + carry, moved[-1][1])
    return moved


def qwen3_prompt(tokenizer: Any, text: str, max_length: int, thinking: bool,
                 emphasis: str = DEFAULT_EMPHASIS) -> Qwen3Prompt:
    """The ids the pipelines tokenize for ``text`` (the chat template applied, truncated at
    ``max_length`` as theirs are: the end goes first), with A1111 emphasis weights."""
    before, after = _template_halves(tokenizer, thinking)
    pieces = [(p, w) for p, w in emphasis_pieces(text, emphasis) if not (p == "BREAK" and w == -1)]
    head, tail = _ids(tokenizer, before), _ids(tokenizer, after)
    if all(w == 1.0 for _, w in pieces):
        plain = "".join(p for p, _ in pieces)
        ids = _ids(tokenizer, before + plain + after)
        weights = [1.0] * len(ids)
        count = len(_ids(tokenizer, plain))
    else:
        body: list[int] = []
        body_weights: list[float] = []
        for piece, weight in _spaces_forward(pieces):
            piece_ids = _ids(tokenizer, piece)
            body += piece_ids
            body_weights += [weight] * len(piece_ids)
        ids = head + body + tail
        weights = [1.0] * len(head) + body_weights + [1.0] * len(tail)
        count = len(body)
    return Qwen3Prompt(ids[:max_length], weights[:max_length], count, max_length - len(head) - len(tail))


def qwen3_token_count(tokenizer: Any, text: str, max_length: int, thinking: bool,
                      emphasis: str = DEFAULT_EMPHASIS) -> tuple[int, int]:
    """(the prompt's tokens, how many fit) for the prompt-length counter."""
    prompt = qwen3_prompt(tokenizer, text, max_length, thinking, emphasis)
    return prompt.count, prompt.limit
