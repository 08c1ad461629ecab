"""Writer for random-weight face restoration files (GFPGAN, CodeFormer, RestoreFormer) that spandrel loads.

The tensors come from spandrel's own modules, built with the hyper-parameters its loaders accept,
so the key layout is the one of the released files (GFPGANv1.4.pth, codeformer.pth,
RestoreFormer.pth) that spandrel recognises. How small each can be is spandrel's decision:

- GFPGAN: spandrel hard-codes every size (512 px, 512 style features, channel multiplier 2),
  so only the full architecture loads: 87 M parameters, 174 MB in float16.
- CodeFormer: the transformer's width, depth, codebook and skip connections are read from the
  shapes (shrunk here to 8 wide, 1 layer, 8 codes, one skip at 32 px), but its VQ autoencoder
  is hard-coded at full size: 68 M parameters, 135 MB in float16.
- RestoreFormer: nearly everything is read from the shapes; only the attention resolution (16)
  and head count (8) are fixed, so it shrinks to 32 channels and one block per level (0.5 M).

The two full-size ones take seconds per 512 px face on a CPU; tests that run them are slow.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from studio.testing.upscalers import write_weights

FACE_KINDS = ("CodeFormer", "GFPGAN", "RestoreFormer")


def make_face_restorer(
    path: Path,
    kind: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    wrap: str | None = None,
) -> Path:
    """Write a random ``kind`` face restorer ("GFPGAN", "CodeFormer" or "RestoreFormer") to ``path``.

    ``path``'s suffix picks the format: ``.safetensors``, or a ``torch.save`` pickle of the plain
    state dict for anything else (``.pth`` as A1111 users have). ``wrap`` (pickles only) nests the
    state dict under that key, as the released files' ``params_ema`` does. ``dtype`` float16
    halves the full-size files; spandrel copies the values into its float32 model. Returns ``path``.
    """
    return write_weights(path, face_restorer_state_dict(kind, seed=seed, dtype=dtype), wrap)


def face_restorer_state_dict(kind: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The tensors :func:`make_face_restorer` writes: the module's default (random) initialisation."""
    if kind not in FACE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FACE_KINDS)}, not {kind!r}")
    # fork_rng: seeding must not move the caller's global random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _build(kind)
    # contiguous clones: safetensors refuses tensors that share storage
    return {key: value.detach().to(dtype).contiguous().clone() for key, value in module.state_dict().items()}


def _build(kind: str) -> nn.Module:
    if kind == "GFPGAN":
        from spandrel.architectures.GFPGAN import GFPGAN

        # the values spandrel's GFPGAN loader passes, whatever the file holds
        return GFPGAN(
            out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
            num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True,
        )
    if kind == "CodeFormer":
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

        # n_head is fixed at 8 by the loader, so the width must be a multiple of 8; latent_size
        # stays 256 because the forward pass hard-codes a 16x16 code grid.
        return CodeFormer(dim_embd=8, n_head=8, n_layers=1, codebook_size=8, latent_size=256, connect_list=["32"])
    from spandrel.architectures.RestoreFormer import RestoreFormer

    # GroupNorm(32) needs multiples of 32 channels; six levels bring 512 px down to the 16 px
    # where the (fixed) attention resolution puts attention blocks, as in the released file.
    return RestoreFormer(
        n_embed=16, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, head_size=8,
    )
