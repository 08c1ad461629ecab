"""img2img, inpainting, hires fix, live previews and the infotext round trip on the flow families
(tiny FLUX.1 files through the real loader and engine)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.preview import JobProgress, LatentPreviewer, fit_latent_rgb
from studio.generation.request import Img2ImgRequest, Txt2ImgRequest
from studio.jobs import JobState
from studio.testing.flux import make_flux_checkpoint, tiny_flux_components

DEV = "flux1-dev-tiny.safetensors"
SCHNELL = "flux1-schnell-tiny.safetensors"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-modes")
    ckpts = root / "models" / "Stable-diffusion"
    make_flux_checkpoint(ckpts / DEV, components=tiny_flux_components("dev", seed=0), dtype=torch.float32)
    make_flux_checkpoint(ckpts / SCHNELL, "schnell", components=tiny_flux_components("schnell", seed=1),
                         dtype=torch.float32)
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def picture(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def img2img(studio, checkpoint=SCHNELL, **fields):
    base = {"prompt": "a red cube", "width": 64, "height": 64, "seed": 3, "steps": 4, "save_images": False,
            "init_images": [picture()], "override_settings": {"sd_model_checkpoint": checkpoint}}
    return studio.engine.submit(Img2ImgRequest(**{**base, **fields})).wait()


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def test_img2img_strength_moves_away_from_the_init_image(studio):
    # the tiny random VAE does not reproduce the picture: compare with its own round trip (strength 0)
    same = img2img(studio, denoising_strength=0.0).images[0]
    near = img2img(studio, denoising_strength=0.25)
    far = img2img(studio, denoising_strength=1.0)
    assert 0 < distance(near.images[0], same) < distance(far.images[0], same)
    assert parse_infotext(near.infotexts[0])["Denoising strength"] == "0.25"


def test_img2img_with_a_multistep_sampler(studio):
    # DPM-Solver has no scale_noise: the init latents are moved along the flow path by the studio
    result = img2img(studio, denoising_strength=0.5, sampler_name="DPM++ 2M")
    assert np.isfinite(np.asarray(result.images[0], dtype=np.float32)).all()


def test_inpainting_keeps_the_unmasked_pixels(studio):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = img2img(studio, mask=mask, denoising_strength=1.0, inpaint_full_res=False, mask_blur=0)
    out, src = np.asarray(result.images[0], dtype=np.int16), np.asarray(picture(), dtype=np.int16)
    assert np.abs(out[:8] - src[:8]).max() <= 1               # far from the mask: the original
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 2   # inside: repainted


def test_hires_fix_second_pass_at_the_larger_size(studio):
    req = Txt2ImgRequest(prompt="a red cube", width=64, height=64, seed=3, steps=2, save_images=False,
                         enable_hr=True, hr_scale=2.0, hr_upscaler="Latent", hr_second_pass_steps=2,
                         denoising_strength=0.6, override_settings={"sd_model_checkpoint": DEV})
    result = studio.engine.submit(req).wait()
    assert result.images[0].size == (128, 128)
    params = parse_infotext(result.infotexts[0])
    assert params["Hires upscale"] == "2" and params["Distilled CFG Scale"] == "3.5"


def test_infotext_round_trip_restores_the_distilled_scale(studio):
    req = Txt2ImgRequest(prompt="a red cube", width=64, height=64, seed=3, steps=2, save_images=False,
                         distilled_cfg_scale=2.5, override_settings={"sd_model_checkpoint": DEV})
    first = studio.engine.submit(req).wait()
    fields = infotext_to_fields(parse_infotext(first.infotexts[0]))
    assert fields["distilled_cfg_scale"] == 2.5 and fields["cfg_scale"] == 1.0
    again = studio.engine.submit(Txt2ImgRequest(
        **{k: v for k, v in fields.items() if k in Txt2ImgRequest.model_fields}, save_images=False,
        override_settings={"sd_model_checkpoint": DEV})).wait()
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def test_live_preview_of_16_channel_latents(studio):
    studio.engine.load(DEV)
    model = studio.engine.models.current
    preview = model.previewer(torch.randn(16, 8, 8))
    assert preview.size == (64, 64)
    state = JobState("job", "test")
    progress = JobProgress(state, preview_every=1, previewer=model.previewer)
    progress.on_pass_start(SimpleNamespace(steps=3))
    progress.on_step_end(SimpleNamespace(index=0, total=3), {"latents": torch.randn(1, 16, 8, 8)})
    assert state.preview is not None and state.preview.size == (64, 64)


class _LinearVae:
    """A VAE whose decoder is an exact linear map per latent cell: the fit must recover it."""

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor):
        self.matrix, self.bias = matrix, bias
        self.config = SimpleNamespace(latent_channels=matrix.shape[0], scaling_factor=0.5, shift_factor=0.1)
        self._param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._param])

    def decode(self, x):
        z = (x - self.config.shift_factor) * self.config.scaling_factor   # back to the sampler's latents
        rgb = torch.einsum("nchw,cr->nrhw", z, self.matrix) + self.bias[None, :, None, None]
        return SimpleNamespace(sample=torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest"))


def test_preview_fit_recovers_a_linear_decoder():
    generator = torch.Generator().manual_seed(1)
    matrix, bias = torch.randn(16, 3, generator=generator) * 0.2, torch.tensor([0.1, -0.2, 0.05])
    vae = _LinearVae(matrix, bias)
    coefs, fitted_bias = fit_latent_rgb(vae, lambda z: z / vae.config.scaling_factor + vae.config.shift_factor)
    torch.testing.assert_close(coefs, matrix, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-4, rtol=1e-4)


def test_four_channel_previews_keep_a1111s_factors():
    model = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(latent_channels=4)), is_sdxl=False,
                            spec=SimpleNamespace(latent=SimpleNamespace(channels=4)))
    latent = torch.randn(4, 8, 8)
    from studio.generation.preview import latent_preview

    assert np.array_equal(np.asarray(LatentPreviewer(model)(latent)), np.asarray(latent_preview(latent)))


def test_cli_generates_with_a_split_flux_model(tmp_path, capsys):
    from studio.cli import main
    from studio.generation.outputs import read_infotext
    from studio.testing.flux import make_clip_l, make_flux_transformer, make_flux_vae, make_t5xxl

    parts = tiny_flux_components("schnell", seed=4)
    models = tmp_path / "models"
    make_flux_transformer(models / "unet" / "flux1-schnell.safetensors", "schnell", components=parts)
    make_clip_l(tmp_path / "encoders" / "clip_l.safetensors", components=parts)
    make_t5xxl(tmp_path / "encoders" / "t5xxl_fp8.safetensors", components=parts)
    make_t5xxl(tmp_path / "encoders" / "t5xxl_fp16.safetensors", components=parts)
    make_flux_vae(models / "VAE" / "ae.safetensors", components=parts)
    common = ["--data-dir", str(tmp_path), "--text-encoder-dir", str(tmp_path / "encoders")]
    assert main(["models", "--kind", "modules", *common]) == 0
    listing = capsys.readouterr().out
    assert "t5xxl_fp8.safetensors\tt5xxl" in listing and "ae.safetensors\tvae16" in listing
    out = tmp_path / "out"
    # two T5 files: the user names one; steps/CFG left unset take schnell's presets
    code = main(["generate", *common, "-p", "a boat", "--width", "64", "--height", "64", "--seed", "5",
                 "--modules", "t5xxl_fp16.safetensors", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    params = parse_infotext(read_infotext(Image.open(next(out.glob("*.png")))))
    assert (params["Steps"], params["CFG scale"], params["Sampler"]) == ("4", "1", "Euler")


@pytest.mark.slow
def test_switching_between_flux_and_sdxl_leaks_no_model(studio):
    import gc

    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from studio.testing import make_checkpoint

    sdxl = studio.paths.ckpt_dirs[0] / "tiny-sdxl.safetensors"
    make_checkpoint(sdxl, "sdxl", seed=5)
    studio.engine.models.refresh()
    try:
        for _ in range(5):
            for name in (DEV, sdxl.name):
                studio.engine.load(name)
                assert len(studio.engine.models.cached()) == 1   # sd_checkpoints_limit 1: one model in RAM
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, (FluxTransformer2DModel, UNet2DConditionModel))]
        assert len(alive) <= 1
    finally:
        studio.engine.models.unload()
        sdxl.unlink()
        studio.engine.models.refresh()


def test_a_prompt_past_t5s_length_gets_a_note(studio):
    long_prompt = " ".join(["a red cube on a green table"] * 90)   # about 630 T5 tokens
    req = Txt2ImgRequest(prompt=long_prompt, width=64, height=64, seed=3, steps=1, save_images=False,
                         override_settings={"sd_model_checkpoint": DEV})
    result = studio.engine.submit(req).wait()
    assert any("T5 tokens; FLUX.1 reads 511" in note for note in result.notes)
    counts = studio.engine.token_counts(long_prompt)
    assert counts["t5"][0] > 511 and counts["clip"][1] == 75


@pytest.mark.slow  # heavy; CI's slow step runs it, the quick suite keeps the family's core tests
def test_a_diffusers_flux_folder_loads_and_matches_the_single_file(studio):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from studio.models.bundled_tokenizers import t5_tokenizer
    from studio.models.tokenizer import make_clip_tokenizer

    folder = studio.paths.ckpt_dirs[0] / "FLUX.1-schnell-tiny"
    parts = tiny_flux_components("schnell", seed=1)   # the weights of SCHNELL's single file
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=make_clip_tokenizer(),
                 tokenizer_2=t5_tokenizer(), **parts).save_pretrained(folder)
    studio.engine.models.refresh()
    try:
        def run(name):
            req = Txt2ImgRequest(prompt="a red cube", width=64, height=64, seed=3, steps=2, save_images=False,
                                 override_settings={"sd_model_checkpoint": name})
            return studio.engine.submit(req).wait()

        from_folder = run(folder.name)
        model = studio.engine.models.current
        assert model.info.is_diffusers and model.probe.variant == "schnell"
        from_file = run(SCHNELL)
        assert np.abs(np.asarray(from_folder.images[0], dtype=np.int16)
                      - np.asarray(from_file.images[0], dtype=np.int16)).max() <= 1
    finally:
        import shutil

        shutil.rmtree(folder)
        studio.engine.models.refresh()
