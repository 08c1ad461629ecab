"""Seed extras (variation seed/strength, resize seed from W×H) and the Tiling option."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.downsampling import Downsample2D
from torch import nn

from studio.generation.noise import batch_seeds, make_noise, slerp, step_noise_generators
from studio.generation.tiling import seamless
from studio.testing import tiny_components

SHAPE = (4, 12, 16)  # (C, latent_h, latent_w): not square, so a swapped w/h shows


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _next_draws(gens: list[torch.Generator]) -> list[torch.Tensor]:
    return [torch.randn(5, generator=g) for g in gens]


# --------------------------------------------------------------------------- slerp


def test_slerp_endpoints():
    low, high = _randn(1, SHAPE), _randn(2, SHAPE)
    torch.testing.assert_close(slerp(0.0, low, high), low)
    torch.testing.assert_close(slerp(1.0, low, high), high)


def test_slerp_keeps_unit_norm_where_lerp_shrinks():
    low = torch.nn.functional.normalize(_randn(3, (6, 64)), dim=1)
    high = torch.nn.functional.normalize(_randn(4, (6, 64)), dim=1)
    mid = slerp(0.5, low, high)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(6))
    # Random directions are near-orthogonal, so the straight midpoint is ~1/sqrt(2) long.
    assert ((low + high) / 2).norm(dim=1).max() < 0.9
    # Halfway means equal angles to both ends.
    torch.testing.assert_close((mid * low).sum(1), (mid * high).sum(1))


def test_slerp_parallel_inputs_fall_back_to_linear():
    low = _randn(5, (3, 32))
    for high in (low.clone(), 2.0 * low):
        out = slerp(0.25, low, high)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, 0.75 * low + 0.25 * high)
        torch.testing.assert_close(slerp(0.0, low, high), low)
        torch.testing.assert_close(slerp(1.0, low, high), high)


def test_slerp_interpolates_along_dim_1_like_a1111():
    # A1111 slerps one image's (C, H, W) noise with the norm over dim 1: each (channel, column)
    # vector over the height gets its own angle. Checked column by column against a plain slerp.
    low, high = _randn(6, SHAPE), _randn(7, SHAPE)
    out = slerp(0.3, low, high)
    c, w = 2, 5
    a, b = low[c, :, w], high[c, :, w]
    omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()))
    expected = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(out[c, :, w], expected)


# --------------------------------------------------------------------------- make_noise


def initial_noise(seeds, shape):
    """The engine's noise before variation seeds existed: one CPU generator per seed."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]), gens


def test_make_noise_is_initial_noise_when_off():
    seeds = [0, 1, 12345, 2**32 - 1]
    ref, ref_gens = initial_noise(seeds, SHAPE)
    variants = [
        make_noise(seeds, SHAPE),
        make_noise(seeds, SHAPE, subseeds=[7, 8, 9, 10], subseed_strength=0.0),
        make_noise(seeds, SHAPE, resize_from=(0, 0)),
        make_noise(seeds, SHAPE, resize_from=None),
        # "Resize from" the target's own size changes nothing.
        make_noise(seeds, SHAPE, resize_from=(SHAPE[2], SHAPE[1])),
    ]
    ref_next = _next_draws(ref_gens)
    for noise, gens in variants:
        assert noise.dtype == torch.float32 and noise.shape == (len(seeds), *SHAPE)
        assert torch.equal(noise, ref)
        for a, b in zip(_next_draws(gens), ref_next):
            assert torch.equal(a, b)


def test_variation_strength_ends_and_middle():
    seeds, subseeds = [11, 12], [21, 22]
    plain, _ = make_noise(seeds, SHAPE)
    other, _ = make_noise(subseeds, SHAPE)
    zero, _ = make_noise(seeds, SHAPE, subseeds=subseeds, subseed_strength=0.0)
    one, _ = make_noise(seeds, SHAPE, subseeds=subseeds, subseed_strength=1.0)
    assert torch.equal(zero, plain)
    torch.testing.assert_close(one, other, atol=1e-5, rtol=1e-5)

    half, gens = make_noise(seeds, SHAPE, subseeds=subseeds, subseed_strength=0.5)
    again, _ = make_noise(seeds, SHAPE, subseeds=subseeds, subseed_strength=0.5)
    assert torch.equal(half, again)
    for i in range(2):
        torch.testing.assert_close(half[i], slerp(0.5, plain[i], other[i]))
        assert (half[i] - plain[i]).abs().mean() > 0.3 and (half[i] - other[i]).abs().mean() > 0.3
    # Slerp keeps the noise at unit variance where a straight blend would give ~0.71.
    assert 0.85 < half.std().item() < 1.15
    # Ancestral samplers keep drawing the main seeds' per-step noise.
    _, plain_gens = make_noise(seeds, SHAPE)
    for a, b in zip(_next_draws(gens), _next_draws(plain_gens)):
        assert torch.equal(a, b)


def test_variation_is_per_image():
    batch, _ = make_noise([5, 5, 5], SHAPE, subseeds=[40, 41, 42], subseed_strength=0.4)
    single, _ = make_noise([5], SHAPE, subseeds=[41], subseed_strength=0.4)
    assert torch.equal(batch[1], single[0])
    assert not torch.equal(batch[0], batch[1])


def test_variation_subseed_past_the_list_is_zero():
    # A1111 uses variation seed 0 for images beyond the subseed list.
    short, _ = make_noise([3, 4], SHAPE, subseeds=[9], subseed_strength=0.6)
    full, _ = make_noise([3, 4], SHAPE, subseeds=[9, 0], subseed_strength=0.6)
    assert torch.equal(short, full)


@pytest.mark.parametrize("strength", [0.0, 0.35])
def test_batch_seeds(strength):
    assert batch_seeds(100, 500, strength, 0, 1) == ([100], [500])
    seeds, subseeds = batch_seeds(100, 500, strength, 1, 3)
    assert subseeds == [503, 504, 505]
    if strength == 0.0:
        assert seeds == [103, 104, 105]
    else:
        assert seeds == [100, 100, 100]


# --------------------------------------------------------------------------- resize seed from


def _own_noise(seed: int) -> torch.Tensor:
    return _randn(seed, SHAPE)


def test_step_noise_generators_carry_on_without_ensd_and_are_reseeded_with_it():
    _, gens = make_noise([5, 6], (4, 8, 8))
    assert step_noise_generators([5, 6], gens, 0) is gens
    for seed, gen in zip([5, 6], step_noise_generators([5, 6], gens, 31337)):
        # A1111's ImageRNG: fresh generators at seed + delta after the first draw
        expected = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed + 31337))
        assert torch.equal(torch.randn(4, 8, 8, generator=gen), expected)


def test_resize_from_smaller_pastes_centre():
    seed = 77
    noise, gens = make_noise([seed], SHAPE, resize_from=(8, 6))  # (latent_w, latent_h)
    small = _randn(seed, (4, 6, 8))
    own = _own_noise(seed)
    # dy = (12 - 6) // 2 = 3, dx = (16 - 8) // 2 = 4
    assert torch.equal(noise[0, :, 3:9, 4:12], small)
    border = torch.ones(SHAPE[1:], dtype=torch.bool)
    border[3:9, 4:12] = False
    assert torch.equal(noise[0][:, border], own[:, border])
    _, plain_gens = make_noise([seed], SHAPE)
    assert torch.equal(_next_draws(gens)[0], _next_draws(plain_gens)[0])


def test_resize_from_smaller_odd_difference_floors_offset():
    noise, _ = make_noise([78], SHAPE, resize_from=(7, 5))
    # dy = (12 - 5) // 2 = 3, dx = (16 - 7) // 2 = 4: the extra row/column of own noise is at the end.
    assert torch.equal(noise[0, :, 3:8, 4:11], _randn(78, (4, 5, 7)))
    assert torch.equal(noise[0, :, :, 11:], _own_noise(78)[:, :, 11:])


def test_resize_from_larger_crops_centre():
    seed = 79
    noise, _ = make_noise([seed], SHAPE, resize_from=(24, 20))
    big = _randn(seed, (4, 20, 24))
    # Offsets (20 - 12) // 2 = 4 and (24 - 16) // 2 = 4 into the larger noise.
    assert torch.equal(noise[0], big[:, 4:16, 4:20])


def test_resize_from_larger_odd_difference_matches_a1111():
    # A1111 floors the negative offset, dx = (16 - 19) // 2 = -2, and then copies only
    # 19 - 4 = 15 columns: the last target column keeps the target seed's own noise.
    seed = 80
    noise, _ = make_noise([seed], SHAPE, resize_from=(19, 12))
    big = _randn(seed, (4, 12, 19))
    assert torch.equal(noise[0, :, :, :15], big[:, :, 2:17])
    assert torch.equal(noise[0, :, :, 15:], _own_noise(seed)[:, :, 15:])


def test_resize_with_variation_slerps_at_the_from_size():
    noise, _ = make_noise([81], SHAPE, subseeds=[91], subseed_strength=0.5, resize_from=(8, 6))
    expected = slerp(0.5, _randn(81, (4, 6, 8)), _randn(91, (4, 6, 8)))
    torch.testing.assert_close(noise[0, :, 3:9, 4:12], expected, atol=0, rtol=0)
    assert torch.equal(noise[0, :, :3], _own_noise(81)[:, :3])


# --------------------------------------------------------------------------- tiling


@pytest.fixture(scope="module")
def tiny():
    return tiny_components("sd1")


def _conv_modes(*modules: nn.Module) -> dict[str, str]:
    return {f"{i}.{name}": m.padding_mode for i, root in enumerate(modules)
            for name, m in root.named_modules() if isinstance(m, nn.Conv2d)}


@torch.no_grad()
def test_vae_decode_of_periodic_latent_tiles_only_when_seamless(tiny):
    vae = tiny["vae"]
    latent = _randn(1, (1, 4, 4, 4)).repeat(1, 1, 2, 2)
    plain = vae.decode(latent).sample
    with seamless(vae):
        tiled = vae.decode(latent).sample
    half = tiled.shape[-1] // 2
    torch.testing.assert_close(tiled[..., :half], tiled[..., half:], atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled[..., :half, :], tiled[..., half:, :], atol=1e-5, rtol=0)
    assert (plain[..., :half] - plain[..., half:]).abs().max() > 1e-2
    # Back to zero padding afterwards.
    assert torch.equal(vae.decode(latent).sample, plain)


def test_padding_modes_restored_even_on_error(tiny):
    unet, vae = tiny["unet"], tiny["vae"]
    odd_one = vae.decoder.conv_in
    odd_one.padding_mode = "reflect"  # a layer that was not zero-padded keeps its own mode
    try:
        before = _conv_modes(unet, vae)
        with seamless(unet, vae):
            during = _conv_modes(unet, vae)
            convs = [m for root in (unet, vae) for m in root.modules() if isinstance(m, nn.Conv2d)]
            assert all(m.padding_mode == "circular" for m in convs if any(p > 0 for p in m.padding))
            assert any(mode == "zeros" for mode in during.values())  # 1x1 convs are left alone
        assert _conv_modes(unet, vae) == before
        with pytest.raises(RuntimeError, match="boom"), seamless(unet, vae):
            raise RuntimeError("boom")
        assert _conv_modes(unet, vae) == before
        downs = [m for m in vae.modules() if isinstance(m, Downsample2D)]
        assert downs and all(not d.conv._forward_pre_hooks for d in downs)
        assert odd_one.padding_mode == "reflect"
    finally:
        odd_one.padding_mode = "zeros"


def test_disabled_is_a_no_op(tiny):
    unet = tiny["unet"]
    before = _conv_modes(unet)
    with seamless(unet, enabled=False):
        assert _conv_modes(unet) == before


@torch.no_grad()
def test_vae_encoder_is_shift_equivariant_when_seamless(tiny):
    # The encoder's Downsample2D zero-pads by hand (F.pad); seamless makes that pad wrap too,
    # so rolling the image by one latent pixel (8 px) rolls the latents by exactly one.
    vae = tiny["vae"]
    image = _randn(2, (1, 3, 32, 32))
    plain = vae.encode(image).latent_dist.mean
    with seamless(vae):
        base = vae.encode(image).latent_dist.mean
        rolled = vae.encode(torch.roll(image, 8, dims=-1)).latent_dist.mean
    torch.testing.assert_close(rolled, torch.roll(base, 1, dims=-1), atol=1e-5, rtol=1e-4)
    assert torch.equal(vae.encode(image).latent_dist.mean, plain)


@torch.no_grad()
def test_unet_output_wraps_around_continuously(tiny):
    unet = tiny["unet"]
    context = _randn(3, (1, 77, 32))
    latent = _randn(4, (1, 4, 8, 8)).repeat(1, 1, 2, 2)  # period 8 in a 16-wide latent
    half = latent.shape[-1] // 2

    def seam_and_interior(out):
        neighbour = (out[..., 1:] - out[..., :-1]).abs()
        wrap = (out[..., 0] - out[..., -1]).abs()
        # The tile boundary inside the picture is an ordinary neighbour pair of the periodic input.
        return wrap, neighbour[..., half - 1], neighbour.mean()

    plain = unet(latent, 10, encoder_hidden_states=context).sample
    with seamless(unet):
        out = unet(latent, 10, encoder_hidden_states=context).sample
        shifted = unet(torch.roll(latent, 4, dims=-1), 10, encoder_hidden_states=context).sample

    wrap, interior, mean_step = seam_and_interior(out)
    # Seamless: going from the last column back to the first is just another step between
    # neighbours, the same as across the tile boundary in the middle and of the usual size.
    torch.testing.assert_close(wrap, interior, atol=1e-6, rtol=1e-4)
    assert wrap.mean() < 3 * mean_step
    # Shifting the input around the torus only shifts the output.
    torch.testing.assert_close(shifted, torch.roll(out, 4, dims=-1), atol=1e-6, rtol=1e-4)

    wrap, interior, _ = seam_and_interior(plain)
    assert (wrap - interior).abs().mean() > 0.1 * interior.mean()
