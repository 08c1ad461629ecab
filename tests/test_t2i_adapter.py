"""T2I-Adapters as ControlNet units: the tiny factory, finding and loading every layout, the
guidance (once per map, inside the window, with ControlNets) and equality with diffusers'
StableDiffusionAdapterPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.controlnet.guidance import ControlUnit, control_residuals
from studio.controlnet.models import ControlNetLibrary, check_family, load_controlnet
from studio.core import Studio
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.generation.samplers import split_sampler_name
from studio.models.state_dict import ModelFileError
from studio.testing import make_checkpoint, tiny_components
from studio.testing.adapters import build_adapter, make_adapter, make_adapter_folder
from studio.testing.controlnets import make_controlnet
from tests.helpers import guided_latents, make_models_dir

LAYOUTS = {  # name -> (family, loaded from)
    "ad-orig.safetensors": ("sd1", "original"),
    "ad-orig.pth": ("sd1", "original"),
    "ad-diffusers.safetensors": ("sd1", "diffusers names"),
    "ad-folder": ("sd1", "folder"),
    "ad-xl.safetensors": ("sdxl", "diffusers names"),
    "ad-xl-folder": ("sdxl", "folder"),
}


def test_tiny_adapter_loads_with_diffusers_and_fits_the_tiny_unets(tmp_path):
    from diffusers import T2IAdapter

    for family, sizes in (("sd1", [(1, 32, 8, 8), (1, 64, 4, 4)]), ("sdxl", [(1, 32, 4, 4), (1, 64, 4, 4)])):
        folder = make_adapter_folder(tmp_path / family, family, seed=1)
        model = T2IAdapter.from_pretrained(folder, local_files_only=True)
        with torch.no_grad():
            features = model(torch.rand(1, 3, 64, 64))
        assert [tuple(f.shape) for f in features] == sizes
        ref = build_adapter(family, seed=1).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    make_models_dir(root)
    make_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sdxl.safetensors", "sdxl", seed=1)
    folder = root / "models" / "ControlNet"
    for name, (family, layout) in LAYOUTS.items():
        if layout == "folder":
            make_adapter_folder(folder / name, family, seed=2)
        else:
            make_adapter(folder / name, family, seed=2, original=layout == "original")
    make_controlnet(folder / "cn-a.safetensors", "sd1", seed=2, components=tiny_components("sd1", seed=1))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    s.select_checkpoint("tiny-sd1.safetensors")
    yield s
    s.queue.shutdown()


def test_every_layout_is_listed_and_loads(studio, tmp_path):
    folder = studio.controlnets.library.folders[0]
    library = ControlNetLibrary([folder], None)
    names = [c.name for c in library.refresh()]
    assert set(LAYOUTS) <= set(names)
    assert all(any(n.startswith(name.split(".")[0] + " [") for n in studio.controlnets.names()) for name in LAYOUTS)
    for name, (family, _) in LAYOUTS.items():
        loaded = load_controlnet(library.find(name), config_cache=tmp_path)
        assert (loaded.probe.kind, loaded.family) == ("T2I-Adapter", family), name
        ref = build_adapter(family, seed=2).state_dict()
        weights = loaded.model.state_dict()
        assert set(weights) == set(ref) and all(torch.equal(weights[k], ref[k]) for k in ref), name


def test_family_mismatch_is_refused(studio, tmp_path):
    library = ControlNetLibrary(studio.controlnets.library.folders, None)
    library.refresh()
    xl = load_controlnet(library.find("ad-xl"), config_cache=tmp_path)
    with pytest.raises(ModelFileError, match="T2I-Adapter ad-xl.safetensors is for SDXL, the loaded checkpoint is "
                                             "SD1.x"):
        check_family(xl, "sd1")
    with pytest.raises(RequestError, match="unit 0: T2I-Adapter ad-xl.* is for SDXL"):
        run(studio, unit(model="ad-xl"))


def test_unsupported_adapter_kinds_say_so(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "light.safetensors"
    light = {"body.0.in_conv.weight": torch.zeros(4, 192, 1, 1), "body.0.body.0.block1.weight": torch.zeros(4, 4, 3, 3)}
    save_file(light, str(path))
    library = ControlNetLibrary([tmp_path], None)
    library.refresh()
    with pytest.raises(ModelFileError, match="T2I-Adapter of a kind not supported"):
        load_controlnet(library.find("light"), config_cache=tmp_path)


# --------------------------------------------------------------------------- in the sampling loop


def hint() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, 64, 64, generator=g) > 0.5).float()


@pytest.fixture(scope="module")
def nets(studio, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    library = studio.controlnets.library
    library.refresh()
    return {n: load_controlnet(library.find(n), config_cache=cache).model for n in ("ad-orig", "ad-xl", "cn-a")}


latents = guided_latents


def test_adapter_runs_once_and_only_inside_its_window(studio, nets):
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    none = latents(studio, model, [])
    assert torch.equal(none, latents(studio, model, [ControlUnit(nets["ad-orig"], hint(), weight=0.0)]))
    calls = []
    handle = nets["ad-orig"].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        one = latents(studio, model, [ControlUnit(nets["ad-orig"], hint(), weight=1.0)])
    finally:
        handle.remove()
    assert not torch.allclose(none, one)
    assert len(calls) == 1  # features of the map, not of the latents: one run for all steps
    # steps 0..3 are at 0, .25, .5, .75: a [0.5, 1] window skips the first two
    unit = ControlUnit(nets["ad-orig"], hint(), guidance_start=0.5)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert control_residuals([unit], x, torch.tensor(500), context, None, 1, 4, 2, 1, True) == {}
        assert "down_intrablock_additional_residuals" in control_residuals([unit], x, torch.tensor(500), context,
                                                                           None, 2, 4, 2, 1, True)


def test_modes_and_mixing_with_a_controlnet(nets):
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)

    def residuals(*units):
        with torch.no_grad():
            return control_residuals(list(units), x, torch.tensor(500), context, None, 0, 4, 2, 1, True)

    features = [f.detach() for f in ControlUnit(nets["ad-orig"], hint()).adapter_features()]
    balanced = residuals(ControlUnit(nets["ad-orig"], hint(), weight=0.5))["down_intrablock_additional_residuals"]
    for f, r in zip(features, balanced):
        assert torch.allclose(r, 0.5 * f.expand(2, -1, -1, -1))  # both CFG halves
    soft = residuals(ControlUnit(nets["ad-orig"], hint(), control_mode=1))["down_intrablock_additional_residuals"]
    assert [torch.allclose(r, s * f.expand(2, -1, -1, -1)) for r, f, s in zip(soft, features, (0.25, 0.62))] == [
        True, True]
    strong = residuals(ControlUnit(nets["ad-orig"], hint(), control_mode=2))["down_intrablock_additional_residuals"]
    assert all(r[0].abs().max() == 0 and torch.allclose(r[1], f[0]) for r, f in zip(strong, features))
    two = residuals(ControlUnit(nets["ad-orig"], hint()), ControlUnit(nets["ad-orig"], hint(), weight=0.5))
    assert all(torch.allclose(r, 1.5 * f.expand(2, -1, -1, -1))
               for r, f in zip(two["down_intrablock_additional_residuals"], features))
    mixed = residuals(ControlUnit(nets["ad-orig"], hint()), ControlUnit(nets["cn-a"], hint()))
    assert set(mixed) == {"down_intrablock_additional_residuals", "down_block_additional_residuals",
                          "mid_block_additional_residual"}


# --------------------------------------------------------------------------- through the studio


def control_image() -> Image.Image:
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[10:50, 20:60] = 255
    return Image.fromarray(arr)


BASE = dict(prompt="a house", negative_prompt="blurry", steps=4, width=64, height=64, seed=11, sampler_name="Euler",
            cfg_scale=6.0, save_images=False, checkpoint="tiny-sd1.safetensors")


def unit(**changes):
    from studio.controlnet.units import ControlNetUnitRequest

    return ControlNetUnitRequest(**{"module": "none", "model": "ad-orig", "image": control_image(),
                                    "resize_mode": "Just Resize", **changes})


def run(studio, *units, **changes):
    return studio.txt2img(Txt2ImgRequest(**{**BASE, **changes}, controlnet_units=tuple(units)))


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


@pytest.mark.slow   # heavy: the README command stays under 8 minutes
def test_units_in_txt2img_sd1_and_sdxl_with_a_controlnet(studio):
    plain = pixels(run(studio))
    assert np.array_equal(plain, pixels(run(studio, unit(weight=0.0))))
    adapted = pixels(run(studio, unit()))
    assert np.abs(plain - adapted).max() > 0
    both = pixels(run(studio, unit(), unit(module="none", model="cn-a")))
    assert np.abs(both - adapted).max() > 0
    xl = dict(checkpoint="tiny-sdxl.safetensors")
    assert np.abs(pixels(run(studio, **xl)) - pixels(run(studio, unit(model="ad-xl-folder"), **xl))).max() > 0


def test_matches_diffusers_adapter_pipeline(studio, nets):
    """Same latents as diffusers' StableDiffusionAdapterPipeline (Euler, CFG, same seed). Latents, not
    pixels: the tiny models move pixels by about one level, within any pixel tolerance."""
    from diffusers import StableDiffusionAdapterPipeline

    from studio.generation.samplers import find_schedule, make_scheduler

    model = studio.select_checkpoint("tiny-sd1.safetensors")
    image = control_image()
    hint_map = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    plain = latents(studio, model, [])
    ours = latents(studio, model, [ControlUnit(nets["ad-orig"], hint_map)])

    spec, schedule = split_sampler_name("Euler", "Automatic")
    scheduler = make_scheduler(spec, find_schedule(spec.default_schedule), model.scheduler_config)
    pipe = StableDiffusionAdapterPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        adapter=nets["ad-orig"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a house", image=image, negative_prompt="", num_inference_steps=4, height=64, width=64,
                  guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    effect = (ours - plain).abs().max().item()
    mismatch = (ours - theirs.to(ours)).abs().max().item()
    assert mismatch < 1e-4 and effect > 100 * mismatch, (effect, mismatch)
