"""ControlNet preprocessor registry: weight-free modules, errors, and one real controlnet-aux load."""

import socket

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.controlnet.preprocessors import (
    Preprocessor,
    PreprocessorError,
    PreprocessorRegistry,
    Slider,
    builtin_preprocessors,
)

W, H = 320, 256  # not a multiple of 64 on one side, so the pad-and-crop path is exercised


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def registry(tmp_path):
    return PreprocessorRegistry.with_builtins(tmp_path / "annotators")


@pytest.fixture(scope="module")
def scene():
    img = Image.new("RGB", (W, H), (200, 200, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((40, 40, 140, 180), fill=(30, 60, 160))
    d.ellipse((180, 60, 290, 170), fill=(220, 40, 40))
    d.line((10, 230, 310, 210), fill=(0, 0, 0), width=4)
    return img


def _check_rgb(img, size):
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size


def test_names_order_and_api_detail(registry):
    names = registry.names()
    assert names[0] == "none"
    assert names[1:] == sorted(names[1:])
    for n in ("canny", "invert", "depth_midas", "softedge_hed", "tile_resample", "openpose"):
        assert n in names
    detail = registry.api_module_detail()
    assert detail["module_list"] == registry.api_module_list()
    assert {registry.canonical(k) for k in detail["module_list"]} <= set(names)
    canny = detail["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    assert canny["sliders"][1]["value"] == 100 and canny["sliders"][2]["value"] == 200
    assert detail["module_detail"]["none"]["sliders"] == []
    assert detail["module_detail"]["scribble_xdog"]["sliders"][1]["value"] == 32
    tile = detail["module_detail"]["tile_resample"]["sliders"]
    assert [(s["min"], s["max"], s["value"]) for s in tile] == [(1.0, 8.0, 1.0)]


def test_duplicate_and_unknown(registry, tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Preprocessor("canny", "Canny again", lambda im, *a, **k: im))
    with pytest.raises(PreprocessorError) as err:
        registry.get("nope")
    assert "nope" in str(err.value) and "canny" in str(err.value) and "depth_midas" in str(err.value)
    empty = PreprocessorRegistry(tmp_path)
    assert empty.names() == []
    for p in builtin_preprocessors(tmp_path):
        empty.register(p)
    assert empty.names() == registry.names()


def test_extension_preprocessor_and_slider_defaults(registry, scene):
    seen = {}

    def run(image, resolution, slider_1, slider_2, **ctx):
        seen.update(res=resolution, s1=slider_1, s2=slider_2, seed=ctx.get("seed"), size=image.size)
        return image.convert("L")  # a grey map must come back as RGB

    registry.register(Preprocessor("ext_demo", "Demo", run, slider_1=Slider("A", 0, 10, 3),
                                   slider_2=Slider("B", 0, 1, 0.5, 0.1), source="my-ext"))
    out = registry.run("ext_demo", scene, resolution=-1, slider_2=5, seed=7)
    _check_rgb(out, (640, 512))  # -1 -> default 512 on the short side
    assert seen == {"res": 512, "s1": 3, "s2": 1.0, "seed": 7, "size": (640, 512)}


def test_none_and_invert(registry, scene):
    out = registry.run("none", scene)
    _check_rgb(out, scene.size)
    assert np.array_equal(np.asarray(out), np.asarray(scene))
    inv = registry.run("invert", scene)
    _check_rgb(inv, scene.size)
    assert np.array_equal(np.asarray(inv), 255 - np.asarray(scene))
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent -> white -> inverted black
    assert np.asarray(registry.run("invert", rgba)).max() == 0


def test_canny_edges_follow_shapes(registry, scene):
    out = registry.run("canny", scene, resolution=256)
    _check_rgb(out, (W, H))
    a = np.asarray(out)
    assert set(np.unique(a)) <= {0, 255}
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    white = a[..., 0] == 255
    assert 0.01 < white.mean() < 0.2  # mostly black
    # The rectangle border at x=40 carries an edge; the inside of the rectangle and the plain
    # background do not.
    assert white[60:160, 38:43].any(axis=1).mean() > 0.9
    assert not white[70:150, 70:110].any()
    assert not white[5:30, 150:170].any()
    # Stricter thresholds keep fewer edge pixels.
    fewer = (np.asarray(registry.run("canny", scene, 256, 250, 255))[..., 0] == 255).sum()
    assert fewer <= white.sum()


def test_resolution_scales_short_side(registry, scene):
    _check_rgb(registry.run("canny", scene, resolution=128), (160, 128))
    _check_rgb(registry.run("blur_gaussian", scene, resolution=100), (125, 100))
    _check_rgb(registry.run("canny", scene, resolution=10_000), (2560, 2048))  # clamped to 2048


def test_blur_smooths(registry, scene):
    out = registry.run("blur_gaussian", scene, resolution=256, slider_1=4)
    _check_rgb(out, (W, H))
    src = np.asarray(scene).astype(float)
    got = np.asarray(out).astype(float)
    assert np.abs(np.diff(got, axis=1)).max() < np.abs(np.diff(src, axis=1)).max()
    assert np.abs(np.diff(got, axis=1)).mean() < np.abs(np.diff(src, axis=1)).mean()
    assert abs(got.mean() - src.mean()) < 3


def test_threshold_is_binary(registry, scene):
    out = np.asarray(registry.run("threshold", scene, resolution=256, slider_1=127))
    assert set(np.unique(out)) == {0, 255}
    assert (out[100, 100] == [0, 0, 255]).all()  # (30, 60, 160) in the rectangle
    assert (out[10, 10] == 255).all()  # light background


def test_scribble_xdog(registry, scene):
    out = registry.run("scribble_xdog", scene, resolution=256)
    _check_rgb(out, (W, H))
    a = np.asarray(out)[..., 0]
    assert set(np.unique(a)) <= {0, 255}
    assert 0.0 < (a == 255).mean() < 0.3
    assert a[215:228, 100:200].max() == 255  # the black line is a stroke
    assert a[5:25, 150:170].max() == 0  # flat background is not
    lenient = (np.asarray(registry.run("scribble_xdog", scene, 256, 2))[..., 0] == 255).sum()
    assert lenient >= (a == 255).sum()


def test_tile_resample(registry, scene):
    same = registry.run("tile_resample", scene)
    assert np.array_equal(np.asarray(same), np.asarray(scene))
    out = registry.run("tile_resample", scene, slider_1=2)
    _check_rgb(out, scene.size)
    a = np.asarray(out).astype(float)
    src = np.asarray(scene).astype(float)
    assert not np.array_equal(a, src)
    assert np.abs(a - src).mean() < 10  # a softened copy, not something else
    assert np.abs(a[90:130, 60:120] - src[90:130, 60:120]).max() < 4


def test_shuffle_deterministic(registry, scene):
    a = registry.run("shuffle", scene, resolution=128)
    _check_rgb(a, (160, 128))
    state = np.random.get_state()[1].copy()
    b = registry.run("shuffle", scene, resolution=128)
    assert np.array_equal(np.random.get_state()[1], state)  # caller's global RNG untouched
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c = registry.run("shuffle", scene, resolution=128, seed=5)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Shuffling moves pixels around but keeps the palette.
    small = np.asarray(scene.resize((160, 128)))
    assert abs(np.asarray(a).astype(float).mean() - small.astype(float).mean()) < 40


def test_lineart_standard(registry, scene):
    out = registry.run("lineart_standard", scene, resolution=256)
    _check_rgb(out, (W, H))
    a = np.asarray(out)[..., 0]
    assert a[215:228, 100:200].max() > 100  # dark line on light ground -> bright line
    assert a[5:25, 150:170].max() < 20


@pytest.mark.parametrize(("name", "filename"), [
    ("depth_midas", "dpt_hybrid-midas-501f0c75.pt"),
    ("softedge_hed", "ControlNetHED.pth"),
    ("openpose", "body_pose_model.pth"),
    ("depth_leres", "res101.pth"),
])
def test_missing_weights_named(tmp_path, scene, no_network, name, filename):
    folder = tmp_path / "annotators"
    folder.mkdir()
    reg = PreprocessorRegistry.with_builtins(folder)
    with pytest.raises(PreprocessorError) as err:
        reg.run(name, scene, resolution=64)
    msg = str(err.value)
    assert msg.startswith(f"{name} needs {filename} in {folder.resolve()}")
    assert "lllyasviel/Annotators" in msg
    assert reg.get(name).needs_weights[0] == filename


def test_missing_second_file_named(tmp_path, scene, no_network):
    (tmp_path / "body_pose_model.pth").write_bytes(b"")
    (tmp_path / "hand_pose_model.pth").write_bytes(b"")
    reg = PreprocessorRegistry.with_builtins(tmp_path)
    with pytest.raises(PreprocessorError, match=r"openpose needs facenet\.pth in "):
        reg.run("openpose", scene, resolution=64)


def test_missing_optional_package_is_named(tmp_path, scene, no_network, monkeypatch):
    import sys

    (tmp_path / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "controlnet_aux.midas", None)  # import now fails as if absent
    reg = PreprocessorRegistry.with_builtins(tmp_path)
    with pytest.raises(PreprocessorError, match=r"controlnet_aux\.midas could not be imported.*'controlnet_aux"):
        reg.run("depth_midas", scene, resolution=64)
    assert "depth_midas" not in reg._models


def test_hed_loads_local_random_weights(tmp_path, scene, no_network):
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), tmp_path / "ControlNetHED.pth")
    reg = PreprocessorRegistry.with_builtins(tmp_path)
    out = reg.run("softedge_hed", scene, resolution=128)
    _check_rgb(out, (160, 128))
    a = np.asarray(out)
    assert (a[..., 0] == a[..., 1]).all()
    first = reg._models["softedge_hed"]
    again = reg.run("softedge_hed", scene, resolution=128)
    assert reg._models["softedge_hed"] is first  # loaded once per registry
    assert np.array_equal(np.asarray(again), a)
    other = PreprocessorRegistry.with_builtins(tmp_path)
    assert "softedge_hed" not in other._models


def test_corrupt_weights_is_clear(tmp_path, scene, no_network):
    (tmp_path / "ControlNetHED.pth").write_bytes(b"not a checkpoint")
    reg = PreprocessorRegistry.with_builtins(tmp_path)
    with pytest.raises(PreprocessorError, match="softedge_hed could not load its weights"):
        reg.run("softedge_hed", scene, resolution=64)
