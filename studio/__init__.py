"""Stable Diffusion studio: one engine under a Gradio UI, an A1111-compatible API and a CLI."""

import os

# PyTorch's CPU allocator asks for transparent huge pages for large tensors when this is set.
# Loading a model writes gigabytes into fresh memory; with 4 KiB pages the page faults cost
# more than the copy itself (full SD1.5, fp16 file -> bf16: 2.4 s instead of 3.2 s). Read by
# torch when it first allocates, so it must be set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
