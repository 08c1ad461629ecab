"""The real CLIP BPE tokenizer, built offline.

Every Stable Diffusion text encoder (CLIP-L, OpenCLIP-H, OpenCLIP-bigG) uses
the same 49,408-token BPE vocabulary. Its only source of truth is
``bpe_simple_vocab_16e6.txt.gz``, which the ``open-clip-torch`` wheel ships, so
the tokenizer can be rebuilt without any hub access. The tokenizers differ
only in their pad token: ``<|endoftext|>`` (SD1, SDXL ``tokenizer``) or ``"!"``
(SD2, SDXL ``tokenizer_2``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import inspect
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers takes ~2 s to import: it loads with the first model, not at start-up
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
MODEL_MAX_LENGTH = 77
VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps only the first 49152 - 256 - 2 merges of the file; the rest of
# the vocabulary is the 256 byte symbols twice (bare and with "</w>") plus
# the two special tokens, which gives 49,408 ids in total.
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Location of the BPE merges file inside the installed open_clip package.

    open_clip is located with ``find_spec`` rather than imported, because
    importing it pulls in timm, torchvision and its model registry.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open-clip-torch is not installed; it ships the CLIP BPE vocabulary")
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-symbol table: printable bytes map to themselves and
    the others to code points from 256 upwards, so that every byte has a
    visible, whitespace-free symbol."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]
    # Insertion order matters: CLIP's vocabulary lists the printable bytes
    # first, then the remapped ones, exactly in this order.
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token -> id) and its ordered BPE merges.

    The result is cached; callers must not mutate it.
    """
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Line 0 is the "#version" header.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != EOS_TOKEN_ID + 1 or vocab[BOS_TOKEN] != BOS_TOKEN_ID:
        raise ValueError(f"unexpected CLIP vocabulary size {len(vocab)} from {bpe_vocab_path()}")
    return vocab, merges  # type: ignore[return-value]


def make_clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` identical to the hub's ``openai/clip-vit-large-patch14`` one.

    ``pad_token`` is ``"<|endoftext|>"`` for SD1 and SDXL ``tokenizer`` and
    ``"!"`` (id 0) for SD2 and SDXL ``tokenizer_2``.
    """
    from transformers import CLIPTokenizer

    if "vocab" not in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers 4 only builds CLIPTokenizer from vocab/merges files.
        with tempfile.TemporaryDirectory() as directory:
            write_tokenizer_files(directory, pad_token=pad_token)
            return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    special = {"unk_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token}
    vocab, merges = clip_vocab_and_merges()
    # Copies, so that the tokenizer can never alter the cached tables.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MODEL_MAX_LENGTH, **special)


def write_tokenizer_files(directory: str | Path, pad_token: str = EOS_TOKEN) -> Path:
    """Write the classic Hugging Face CLIP tokenizer files into ``directory``.

    These are the files of the hub's SD repos (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``, ``special_tokens_map.json``), so both
    transformers 4 and 5 load them with ``CLIPTokenizer.from_pretrained``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = "\n".join(f"{a} {b}" for a, b in merges)
    (directory / "merges.txt").write_text("#version: 0.2\n" + merge_lines + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return directory
