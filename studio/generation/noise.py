"""Initial noise with A1111's seed extras: variation seed/strength and "resize seed from".

Noise is drawn on the CPU, one ``torch.Generator`` per image seeded with that image's seed, so an
image depends only on its own seed and not on its place in the batch or on the device. With no
variation and no resize the result is exactly the plain per-seed CPU noise,
so images made before these options existed keep their pixels.

- **Variation** (``subseed_strength > 0``): the seed's noise is spherically interpolated towards
  the variation seed's noise (A1111 ``slerp``), so strength 0 is the seed's image and 1 the
  variation seed's, with the noise's scale kept in between (a straight blend would shrink it).
- **Resize seed from W×H**: the noise is drawn at the latent size of W×H and pasted, centred, into
  the target's own noise, so a composition found at one size roughly survives a size change.
- **Batches** (:func:`batch_seeds`): seeds run seed+i, unless variation is on, when the seed stays
  put and the variation seeds run subseed+i -- a batch is then variations of one image.
- **ENSD** (:func:`step_noise_generators`, A1111's ``eta_noise_seed_delta``): the noise that
  ancestral and SDE samplers draw between steps comes from generators seeded seed + delta; the
  initial noise keeps the seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Above this mean cosine the two inputs are treated as parallel: acos and the 1/sin(omega) weights
# lose all precision there (0/0 for equal inputs). A1111's threshold, so the same cases fall back.
_PARALLEL_DOT = 0.9995


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation from ``low`` (``val`` 0) to ``high`` (``val`` 1) along dim 1.

    The vectors are the slices along dim 1, as in A1111, which calls this on one image's
    ``(C, H, W)`` noise: each channel's column is interpolated over the height axis with its own
    angle. Keeping that axis (rather than slerping the flattened tensor) is what reproduces A1111's
    variation images; for ``(N, D)`` input it is the usual row-wise slerp. When the inputs are
    (nearly) parallel on average it falls back to linear interpolation.
    """
    low_dir = low / torch.norm(low, dim=1, keepdim=True)
    high_dir = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_dir * high_dir).sum(1)
    if dot.mean() > _PARALLEL_DOT:
        # A1111 weighs this fallback the other way round (low * val + high * (1 - val)). It is only
        # reached when seed and variation seed give the same noise, where both orders agree, so
        # the textbook order is kept: it makes val=0 -> low and val=1 -> high hold everywhere.
        return low * (1.0 - val) + high * val
    # Rounding can push a cosine a hair past +-1 on some slice; acos would then give NaN.
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    so = torch.sin(omega)
    w_low = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1)
    w_high = (torch.sin(val * omega) / so).unsqueeze(1)
    return w_low * low + w_high * high


def batch_seeds(
    seed: int, subseed: int, subseed_strength: float, batch_index: int, batch_size: int
) -> tuple[list[int], list[int]]:
    """Seeds and variation seeds of batch ``batch_index`` (0-based, of Batch count) of ``batch_size``.

    Image ``k`` of the whole run (``batch_index * batch_size + i``) gets seed ``seed + k``, or
    ``seed`` itself when variation is on, and always variation seed ``subseed + k``.
    """
    first = batch_index * batch_size
    offsets = range(first, first + batch_size)
    seeds = [seed + (0 if subseed_strength > 0 else k) for k in offsets]
    subseeds = [subseed + k for k in offsets]
    return seeds, subseeds


def _randn(seed: int, shape: tuple[int, ...]) -> Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _paste_centred(source: Tensor, target: Tensor) -> Tensor:
    """``target`` with the centred overlap of ``source`` (C, h, w) copied in; either may be larger."""
    out = target.clone()
    _, th, tw = target.shape
    _, sh, sw = source.shape
    # Floor division as A1111 does, so odd size differences put the extra row/column where it does.
    dy, dx = (th - sh) // 2, (tw - sw) // 2
    h = sh if dy >= 0 else sh + 2 * dy
    w = sw if dx >= 0 else sw + 2 * dx
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    out[:, ty:ty + h, tx:tx + w] = source[:, sy:sy + h, sx:sx + w]
    return out


def make_noise(
    seeds: list[int],
    shape: tuple[int, int, int],
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
) -> tuple[Tensor, list[torch.Generator]]:
    """Initial noise ``[len(seeds), *shape]`` (float32, CPU) and the generators of the main seeds.

    ``shape`` is ``(channels, latent_h, latent_w)``. ``subseeds[i]`` is image i's variation seed
    (0 past the end of the list, as in A1111); variation applies only when ``subseed_strength`` > 0
    and ``subseeds`` is given. ``resize_from`` is ``(latent_w, latent_h)`` of the "resize seed
    from" size; ``None`` or a non-positive side turns it off.

    Each returned generator has drawn exactly one target-shape tensor, as in the plain case, so
    ancestral samplers that go on drawing from it get the same per-step noise whatever the options.
    """
    from_shape = shape
    if resize_from is not None and resize_from[0] > 0 and resize_from[1] > 0:
        from_shape = (shape[0], resize_from[1], resize_from[0])
    resized = from_shape != shape
    vary = subseeds is not None and subseed_strength > 0

    gens: list[torch.Generator] = []
    images: list[Tensor] = []
    for i, seed in enumerate(seeds):
        gen = torch.Generator("cpu").manual_seed(seed)
        own = torch.randn(shape, generator=gen, dtype=torch.float32)
        gens.append(gen)
        # The resized draw needs a fresh generator: the main one has moved past the seed's start.
        noise = _randn(seed, from_shape) if resized else own
        if vary:
            subseed = subseeds[i] if i < len(subseeds) else 0
            noise = slerp(subseed_strength, noise, _randn(subseed, from_shape))
        if resized:
            noise = _paste_centred(noise, own)
        images.append(noise)
    return torch.stack(images), gens


def step_noise_generators(seeds: list[int], initial: list[torch.Generator],
                          delta: int) -> list[torch.Generator]:
    """The generators a sampler draws its per-step noise from. With no delta they are the initial
    noise's own generators, carried on (so images made before ENSD existed keep their pixels); with
    one, fresh generators seeded ``seed + delta``, as A1111's ``ImageRNG`` makes after its first draw."""
    if not delta:
        return initial
    return [torch.Generator("cpu").manual_seed(seed + delta) for seed in seeds]
