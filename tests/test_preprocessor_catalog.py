"""The preprocessor catalogue against sd-webui-controlnet's: every module listed with its sliders
under either of the extension's names, the extension's internal keys resolving to the studio's
modules, each weight-needing module naming every missing annotator file, and the variants of one
detector sharing its network (random-weight files in the real layouts; no network, no downloads)."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.controlnet.preprocessors import (
    Preprocessor,
    PreprocessorError,
    PreprocessorRegistry,
    builtin_preprocessors,
)
from studio.controlnet.units import lenient_params

BUILTINS = builtin_preprocessors(Path("unused"))
WEIGHTED = [p for p in BUILTINS if p.needs_weights]
RES = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def registry(tmp_path) -> PreprocessorRegistry:
    return PreprocessorRegistry.with_builtins(tmp_path / "annotators")


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    img = Image.new("RGB", (96, 80), (200, 200, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((10, 10, 40, 60), fill=(30, 60, 160))
    d.ellipse((50, 20, 90, 70), fill=(220, 40, 40))
    d.line((0, 75, 95, 70), fill=(0, 0, 0), width=3)
    return img


def shown_sliders(p: Preprocessor) -> list[dict]:
    sliders = (p.resolution if p.resolution_listed else None, p.slider_1, p.slider_2)
    return [s.api_dict() for s in sliders if s is not None]


# --------------------------------------------------------------------------- the listing


@pytest.mark.parametrize("alias_names", [False, True])
def test_every_module_is_listed_once_with_its_sliders(registry, alias_names):
    body = registry.api_module_detail(alias_names=alias_names)
    assert body["module_list"] == list(body["module_detail"]) == registry.api_module_list(alias_names)
    assert len(set(body["module_list"])) == len(body["module_list"])
    for name in registry.names():
        p = registry.get(name)
        key = (p.ext_label if alias_names else p.ext_name) or name
        assert key in body["module_detail"], (name, key)
        listed = registry.get(key)
        # an IP-Adapter module's pair is listed under one key: same (empty) sliders either way
        assert body["module_detail"][key] == {"model_free": listed.model_free, "sliders": shown_sliders(p)}
    # every listed key is something a unit may name
    assert all(key in registry for key in body["module_list"])


def test_the_extensions_keys_and_ui_names():
    registry = PreprocessorRegistry.with_builtins("unused")
    keys = registry.api_module_list()
    labels = registry.api_module_list(alias_names=True)
    for key in ("hed", "hed_safe", "pidinet", "pidinet_safe", "pidinet_scribble", "pidinet_sketch", "depth",
                "normal_map", "lineart", "color", "inpaint", "invert", "lineart_standard", "ip-adapter_clip_sd15",
                "depth_leres++", "lineart_coarse", "openpose_faceonly", "softedge_teed", "mobile_sam"):
        assert key in keys
    for label in ("softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "scribble_pidinet",
                  "t2ia_sketch_pidi", "depth_midas", "normal_midas", "lineart_realistic", "t2ia_color_grid",
                  "inpaint_global_harmonious", "invert (from white bg & black line)",
                  "lineart_standard (from white bg & black line)", "ip-adapter_clip_h"):
        assert label in labels
    assert not set(keys) & {"depth_midas", "softedge_hed", "t2ia_color_grid", "ip-adapter_clip_h"}
    assert not set(labels) & {"depth", "hed", "color", "inpaint", "ip-adapter_clip_sd15"}
    assert registry.names().count("t2ia_color_grid") == 1 and "color" not in registry.names()


# the extension's own slider declarations (scripts/preprocessor/legacy/preprocessor_compiled.py,
# teed.py, model_free_preprocessors.py), listed under its internal keys
EXTENSION_SLIDERS = {
    "normal_map": [RES, {"name": "Normal Background Threshold", "value": 0.4, "min": 0.0, "max": 1.0,
                         "step": 0.01}],
    "depth_leres++": [RES, {"name": "Remove Near %", "value": 0, "min": 0, "max": 100, "step": 0.1},
                      {"name": "Remove Background %", "value": 0, "min": 0, "max": 100, "step": 0.1}],
    "softedge_teed": [RES, {"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}],
    "softedge_anyline": [{**RES, "value": 1280}, {"name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}],
    "mediapipe_face": [RES, {"name": "Max Faces", "value": 1, "min": 1, "max": 10, "step": 1},
                       {"name": "Min Face Confidence", "value": 0.5, "min": 0.01, "max": 1.0, "step": 0.01}],
    "mlsd": [RES, {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01},
             {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20.0, "step": 0.01}],
    "threshold": [RES, {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255, "step": 0.01}],
    "scribble_xdog": [RES, {"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64, "step": 0.01}],
    "hed": [RES], "hed_safe": [RES], "scribble_hed": [RES], "depth": [RES], "openpose": [RES],
    "openpose_full": [RES], "mobile_sam": [RES], "color": [RES],
    # the extension hides these modules' resolution slider
    "pidinet": [], "pidinet_safe": [], "pidinet_scribble": [], "pidinet_sketch": [], "lineart": [],
    "lineart_coarse": [], "lineart_anime": [], "normal_bae": [], "depth_zoe": [], "openpose_face": [],
    "openpose_faceonly": [], "openpose_hand": [], "shuffle": [], "lineart_standard": [],
}


@pytest.mark.parametrize("key", sorted(EXTENSION_SLIDERS))
def test_sliders_equal_the_extensions(key):
    detail = PreprocessorRegistry.with_builtins("unused").api_module_detail()["module_detail"]
    assert detail[key] == {"model_free": False, "sliders": EXTENSION_SLIDERS[key]}


# --------------------------------------------------------------------------- aliases


def test_aliases_resolve_to_the_same_module(registry):
    aliases = registry.aliases()
    for alias, name in {"hed": "softedge_hed", "hed_safe": "softedge_hedsafe", "pidinet": "softedge_pidinet",
                        "pidinet_safe": "softedge_pidisafe", "pidinet_scribble": "scribble_pidinet",
                        "pidinet_sketch": "t2ia_sketch_pidi", "depth": "depth_midas", "lineart": "lineart_realistic",
                        "normal_map": "normal_midas", "color": "t2ia_color_grid",
                        "inpaint_global_harmonious": "inpaint"}.items():
        assert aliases[alias] == name
    for alias, name in aliases.items():
        assert alias in registry and alias not in registry.names()
        assert registry.canonical(alias) == name
        assert registry.get(alias) is registry.get(name)
        assert registry.resolve_params(alias, 300, 5, 5) == registry.resolve_params(name, 300, 5, 5)
    assert registry.canonical("depth_midas") == "depth_midas"
    with pytest.raises(PreprocessorError, match="unknown preprocessor 'segmentation'"):
        registry.get("segmentation")   # needs UniFormer, which controlnet-aux does not ship
    assert "segmentation" not in registry


@pytest.mark.parametrize("alias", ["color", "invert (from white bg & black line)",
                                   "lineart_standard (from white bg & black line)", "inpaint_global_harmonious"])
def test_a_detect_through_an_alias_gives_the_same_map(registry, scene, alias):
    """What /controlnet/detect and a unit do with a module name: the lenient slider values, then the run."""
    name = registry.canonical(alias)
    maps = []
    for module in (alias, name):
        res, a, b = lenient_params(registry.get(module), 96, -1, -1)
        maps.append(np.asarray(registry.run(module, scene, res, a, b)))
    assert maps[0].shape == maps[1].shape and np.array_equal(maps[0], maps[1])


def test_an_extension_name_does_not_shadow_a_registered_one(registry, scene):
    registry.register(Preprocessor("depth", "an extension's own depth", lambda im, *a, **k: im, resolution=None,
                                   source="my-ext"))
    assert registry.get("depth").source == "my-ext"
    assert "depth" not in registry.aliases()
    registry.unregister("depth_midas")
    assert "depth_midas" not in registry and registry.get("depth").source == "my-ext"


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("name", [p.name for p in WEIGHTED])
def test_each_missing_annotator_file_is_named(tmp_path, scene, no_network, name):
    folder = tmp_path / "annotators"
    folder.mkdir()
    registry = PreprocessorRegistry.with_builtins(folder)
    files = registry.get(name).needs_weights
    mask = Image.new("L", scene.size, 0)
    for i, filename in enumerate(files):
        with pytest.raises(PreprocessorError) as err:
            registry.run(name, scene, resolution=64, mask=mask)
        message = str(err.value)
        assert filename in message and str(folder.resolve()) in message and name in message
        assert "download" in message or "from" in message
        (folder / filename).write_bytes(b"")   # present now: the next missing one is named
        assert not any(f in message for f in files[i + 1:])


def test_files_come_from_their_repositories():
    files = {p.name: p.needs_weights for p in WEIGHTED}
    assert files["softedge_hedsafe"] == files["scribble_hed"] == ("ControlNetHED.pth",)
    assert files["normal_midas"] == ("dpt_hybrid-midas-501f0c75.pt",)
    assert files["openpose_faceonly"] == ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
    assert files["lineart_coarse"] == ("sk_model.pth", "sk_model2.pth")
    assert files["depth_leres++"] == ("res101.pth", "latest_net_G.pth")
    assert files["softedge_teed"] == ("7_model.pth",)
    assert files["softedge_anyline"] == ("MTEED.pth",)
    assert files["mobile_sam"] == ("mobile_sam.pt",)


def test_teed_names_its_own_repository(registry, scene, no_network):
    with pytest.raises(PreprocessorError, match=r"softedge_teed needs 7_model\.pth in .*qinglong_controlnet-lllite"):
        registry.run("softedge_teed", scene, resolution=64)
    with pytest.raises(PreprocessorError, match=r"softedge_anyline needs MTEED\.pth in .*MistoLine"):
        registry.run("softedge_anyline", scene, resolution=64)


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is not None, reason="mediapipe is installed")
def test_mediapipe_face_without_mediapipe_says_so(registry, scene):
    with pytest.raises(PreprocessorError, match="mediapipe_face needs the Python package 'mediapipe'"):
        registry.run("mediapipe_face", scene, resolution=64)


# --------------------------------------------------------------------------- variants share one network


def _hed_file(folder: Path) -> None:
    from controlnet_aux.hed import ControlNetHED_Apache2

    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")


def _pidinet_file(folder: Path) -> None:
    from controlnet_aux.pidi.model import pidinet

    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in pidinet().state_dict().items()}},
               folder / "table5_pidinet.pth")


def _lineart_files(folder: Path) -> None:
    from controlnet_aux.lineart import Generator

    torch.manual_seed(0)
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
    torch.save(Generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")


def _teed_files(folder: Path) -> None:
    from controlnet_aux.teed.ted import TED

    torch.manual_seed(0)
    state = TED().state_dict()
    torch.save(state, folder / "7_model.pth")
    torch.save(state, folder / "MTEED.pth")


@pytest.mark.parametrize("make, modules, shared", [
    (_hed_file, ("softedge_hed", "hed_safe", "scribble_hed"), "softedge_hed"),
    (_pidinet_file, ("pidinet", "softedge_pidisafe", "pidinet_scribble", "t2ia_sketch_pidi"), "softedge_pidinet"),
    (_lineart_files, ("lineart", "lineart_coarse"), "lineart_realistic"),
])
def test_variants_run_on_one_loaded_network(tmp_path, scene, no_network, make, modules, shared):
    make(tmp_path)
    registry = PreprocessorRegistry.with_builtins(tmp_path)
    maps = {}
    for module in modules:
        out = registry.run(module, scene, resolution=64)
        assert out.mode == "RGB" and out.size == (77, 64)   # short side at the resolution, aspect kept
        maps[module] = np.asarray(out)
        assert list(registry._models) == [shared]          # one network for all of them
    # each variant is its own map: "safe" quantises soft edges, coarse is another network, ...
    assert not np.array_equal(maps[modules[0]], maps[modules[1]])
    for module in modules:
        if "scribble" in module or module == "t2ia_sketch_pidi":
            assert set(np.unique(maps[module])) <= {0, 255}   # scribbles and sketches are binary


def test_teed_and_anyline(tmp_path, scene, no_network):
    _teed_files(tmp_path)
    registry = PreprocessorRegistry.with_builtins(tmp_path)
    for module, steps in (("softedge_teed", 2), ("softedge_teed", 0), ("softedge_anyline", -1)):
        out = registry.run(module, scene, resolution=64, slider_1=steps)
        assert out.mode == "RGB" and out.size == (77, 64)
    assert sorted(registry._models) == ["softedge_anyline", "softedge_teed"]
