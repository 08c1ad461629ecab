"""Writers for tiny textual-inversion embedding files in the real on-disk layouts (formats.md 3.1).

Each writer creates the parent folder and returns the path, so tests can build an embeddings
folder in a few lines. Vectors are ``[n_vectors, width]`` tensors (see :func:`random_vectors`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def random_vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Deterministic float32 ``[n, width]`` vectors."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=generator, dtype=torch.float32)


def write_a1111_pt(
    path: Path,
    vectors: torch.Tensor,
    name: str | None = None,
    step: int | None = 0,
    *,
    sd_checkpoint: str | None = None,
    sd_checkpoint_name: str | None = None,
    legacy_parameter_dict: bool = False,
) -> Path:
    """A1111's ``Embedding.save`` layout; ``legacy_parameter_dict`` writes the torch-1.11-era
    variant whose ``string_to_param`` is an ``nn.ParameterDict``."""
    path = _prepare(path)
    vec = vectors.detach().clone()
    params: object = {"*": vec}
    if legacy_parameter_dict:
        params = nn.ParameterDict({"*": nn.Parameter(vec, requires_grad=False)})
    torch.save(
        {
            "string_to_token": {"*": 265},  # the id of "*" in the CLIP vocabulary, as A1111 writes
            "string_to_param": params,
            "name": path.stem if name is None else name,
            "step": step,
            "sd_checkpoint": sd_checkpoint,
            "sd_checkpoint_name": sd_checkpoint_name,
        },
        path,
    )
    return path


def write_kohya_safetensors(path: Path, vectors: torch.Tensor) -> Path:
    """kohya sd-scripts ``train_textual_inversion.py`` layout: ``{"emb_params": [n, width]}``."""
    path = _prepare(path)
    save_file({"emb_params": vectors.detach().contiguous()}, str(path))
    return path


def write_sdxl_safetensors(path: Path, clip_l: torch.Tensor, clip_g: torch.Tensor) -> Path:
    """SDXL layout shared by kohya and A1111: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``."""
    path = _prepare(path)
    save_file({"clip_l": clip_l.detach().contiguous(), "clip_g": clip_g.detach().contiguous()}, str(path))
    return path


def write_diffusers(path: Path, token: str, vectors: torch.Tensor) -> Path:
    """diffusers ``learned_embeds`` layout ``{token: [n, width]}``.

    Written with safetensors when the suffix is ``.safetensors``, else with ``torch.save`` (``.bin``).
    """
    path = _prepare(path)
    data = {token: vectors.detach().contiguous()}
    if path.suffix.lower() == ".safetensors":
        save_file(data, str(path))
    else:
        torch.save(data, path)
    return path


def _prepare(path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
