"""The T5-XXL and Qwen3 tokenizers, shipped with the package.

SD3/SD3.5 (``tokenizer_3``), FLUX.1 and Chroma encode prompts with T5-XXL's SentencePiece
unigram vocabulary; Z-Image and FLUX.2 Klein with Qwen3's byte-level BPE. The hub is never
reached: each tokenizer is the hub's ``tokenizer.json`` under ``configs/tokenizers/`` (Qwen3
also ships its chat template, which both Qwen pipelines apply to every prompt), and the
settings of the hub's ``tokenizer_config.json`` are written here. Where the files come from,
their hashes and how to re-derive them: ``configs/tokenizers/README.md`` and
``tools/derive_tokenizers.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes ~2 s to import: it loads with the first model, not at start-up
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast, T5TokenizerFast

TOKENIZERS_DIR = Path(__file__).parent / "configs" / "tokenizers"
T5_TOKENIZER_FILE = TOKENIZERS_DIR / "t5" / "tokenizer.json"
QWEN3_TOKENIZER_FILE = TOKENIZERS_DIR / "qwen3" / "tokenizer.json"
QWEN3_CHAT_TEMPLATE_FILE = TOKENIZERS_DIR / "qwen3" / "chat_template.jinja"

# The hub's tokenizer_config.json of FLUX.1 (tokenizer_2) and SD3 (tokenizer_3): T5-XXL was
# trained on 512 tokens. The pipelines pass their own max_sequence_length (SD3 256, FLUX 512).
T5_MODEL_MAX_LENGTH = 512
T5_PAD_TOKEN = "<pad>"
T5_EOS_TOKEN = "</s>"
T5_UNK_TOKEN = "<unk>"
T5_EXTRA_IDS = 100  # the <extra_id_N> sentinels, already in tokenizer.json as ids 32000-32099

# Qwen3's tokenizer_config.json (Qwen3-4B/8B, as Z-Image and FLUX.2 Klein ship it).
QWEN3_MODEL_MAX_LENGTH = 131072
QWEN3_PAD_TOKEN = "<|endoftext|>"
QWEN3_EOS_TOKEN = "<|im_end|>"


@functools.lru_cache(maxsize=2)  # the two tokenizer.json files
def _parsed_tokenizer(path: Path) -> Tokenizer:
    """The ``tokenizers`` object of a shipped tokenizer.json, parsed once.

    Never handed out: transformers deep-copies ``tokenizer_object``, so every tokenizer built
    below owns its backend (a fast tokenizer's padding and truncation settings are changed by
    each call, so sharing one between models would not be safe).
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


@functools.lru_cache(maxsize=1)  # the chat template
def _shipped_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _special_added_tokens(backend: Tokenizer, excluding: str) -> list[str]:
    added = sorted(backend.get_added_tokens_decoder().items())
    return [token.content for _, token in added if token.special and token.content != excluding]


def t5_tokenizer() -> T5TokenizerFast:
    """A new ``T5TokenizerFast`` equal to the hub's ``google/t5-v1_1-xxl`` one (FLUX.1
    ``tokenizer_2``, SD3 ``tokenizer_3``): 32,100 ids, ``</s>`` appended, ``<pad>`` = 0."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_object=_parsed_tokenizer(T5_TOKENIZER_FILE),
        eos_token=T5_EOS_TOKEN,
        unk_token=T5_UNK_TOKEN,
        pad_token=T5_PAD_TOKEN,
        extra_ids=T5_EXTRA_IDS,
        model_max_length=T5_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=True,
    )


def qwen3_tokenizer() -> Qwen2TokenizerFast:
    """A new ``Qwen2TokenizerFast`` equal to the hub's Qwen3 one (Z-Image, FLUX.2 Klein): no
    special token added to plain text, ``<|endoftext|>`` pads, and the chat template with
    Qwen3's ``enable_thinking`` switch."""
    from transformers import Qwen2TokenizerFast

    backend = _parsed_tokenizer(QWEN3_TOKENIZER_FILE)
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        # The hub's list: every special added token but the pad token (<|im_start|>, <|im_end|>,
        # the vision and box markers), so all_special_tokens and decoding match it.
        additional_special_tokens=_special_added_tokens(backend, excluding=QWEN3_PAD_TOKEN),
        bos_token=None,
        unk_token=None,
        eos_token=QWEN3_EOS_TOKEN,
        pad_token=QWEN3_PAD_TOKEN,
        model_max_length=QWEN3_MODEL_MAX_LENGTH,
        chat_template=_shipped_text(QWEN3_CHAT_TEMPLATE_FILE),
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
