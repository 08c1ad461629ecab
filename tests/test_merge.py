"""Checkpoint Merger (studio.merge): A1111's arithmetic, names and metadata, the streaming
safetensors writer, and the refusals, on tiny real-layout checkpoints."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from studio.devices import resolve_policy
from studio.errors import RequestError
from studio.generation.request import build_request
from studio.merge import MergeRequest, SafetensorsWriter, TensorSpec, merge_checkpoints
from studio.merge import merger as merger_module
from studio.models.catalog import CheckpointInfo, sha256_file
from studio.models.loader import load_checkpoint
from studio.models.state_dict import read_safetensors_header
from studio.testing import make_checkpoint, make_flux_checkpoint, make_flux_transformer, make_flux_vae, make_vae

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge_models")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        make_checkpoint(root / f"{name}.safetensors", "sd1", seed=seed)
    make_vae(root / "tiny.vae.safetensors", "sd1", seed=4)
    return root


def resolver(root: Path):
    def resolve(name: str) -> CheckpointInfo:
        path = next((p for p in root.iterdir() if name in (p.stem, p.name) and p.suffix in (".safetensors", ".ckpt")),
                    None)
        if path is None:
            raise RequestError(f"Checkpoint {name!r} not found")
        return CheckpointInfo(path=path, name=path.name)
    return resolve


def merge(root: Path, out: Path, progress=None, **fields):
    req = MergeRequest(**fields)
    return merge_checkpoints(req, resolver(root), lambda name: root / name, out, progress=progress)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --------------------------------------------------------------------------------------------- writer


def _write(path: Path, tensors_: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    with open(path, "wb") as f:
        writer = SafetensorsWriter(f, {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in tensors_.items()},
                                   metadata)
        for key in writer.order:
            writer.write(key, tensors_[key])
        writer.finish()


def test_writer_writes_the_bytes_save_file_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    sample = {
        "w32": torch.randn(3, 5, generator=g), "w16": torch.randn(7, generator=g).half(),
        "wbf": torch.randn(2, 3, generator=g).bfloat16(), "w64": torch.randn(2, generator=g).double(),
        "ids": torch.arange(5), "i32": torch.tensor([1, -2], dtype=torch.int32), "flag": torch.tensor([True, False]),
        "u8": torch.tensor([1, 255], dtype=torch.uint8), "fp8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(0.25), "empty": torch.zeros(0, 4),
    }
    for metadata in ({"format": "pt"}, None, {}):
        path = tmp_path / "w.safetensors"
        _write(path, sample, metadata)
        assert path.read_bytes() == save(sample, metadata)
        with safe_open(str(path), "pt") as f:
            if metadata:
                assert f.metadata() == metadata
            for key, value in sample.items():
                got = f.get_tensor(key)
                assert got.dtype == value.dtype and torch.equal(got.reshape(-1).view(torch.uint8),
                                                                    value.reshape(-1).view(torch.uint8))


def test_writer_refuses_data_that_disagrees_with_its_header(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (2,)), "b": TensorSpec(torch.float32, (3,))}
    with open(tmp_path / "x.safetensors", "wb") as f:
        writer = SafetensorsWriter(f, specs, None)
        with pytest.raises(ValueError, match="out of order"):
            writer.write("b", torch.zeros(3))
        with pytest.raises(ValueError, match="header says"):
            writer.write("a", torch.zeros(2, dtype=torch.float16))
        writer.write("a", torch.zeros(2))
        with pytest.raises(ValueError, match="never written"):
            writer.finish()


# --------------------------------------------------------------------------------------------- arithmetic


def test_weighted_sum_at_0_is_a_at_1_is_b_and_at_half_their_mean(models, tmp_path):
    a, b = tensors(models / "a.safetensors"), tensors(models / "b.safetensors")
    at0 = tensors(merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=0).path)
    assert at0.keys() == a.keys()
    assert all(torch.equal(at0[k], a[k]) and at0[k].dtype == a[k].dtype for k in a)
    at1 = tensors(merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=1).path)
    assert all(torch.equal(at1[k], b[k]) for k in a if k != POSITION_IDS)
    assert torch.equal(at1[POSITION_IDS], a[POSITION_IDS])   # never merged (A1111's skip list)
    half = tensors(merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=0.5).path)
    for key in a:
        if a[key].is_floating_point():
            assert torch.equal(half[key], 0.5 * a[key] + 0.5 * b[key])
            torch.testing.assert_close(half[key], (a[key] + b[key]) / 2)


def test_save_as_half_stores_float16_of_the_full_precision_result(models, tmp_path):
    full = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=0.3)
    half = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=0.3,
                 save_as_half=True, custom_name="half")
    full_t, half_t = tensors(full.path), tensors(half.path)
    for key, value in full_t.items():
        if value.is_floating_point():
            assert half_t[key].dtype == torch.float16 and torch.equal(half_t[key], value.half())
        else:
            assert torch.equal(half_t[key], value)   # position_ids stay int64
    assert half.path.stat().st_size < full.path.stat().st_size * 0.6


def test_add_difference_is_a_plus_m_times_b_minus_c(models, tmp_path):
    a, b, c = (tensors(models / f"{n}.safetensors") for n in "abc")
    result = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", tertiary_model_name="c",
                   interp_method="Add difference", multiplier=0.7)
    assert result.path.name == "a + 0.7(b - c).safetensors"
    out = tensors(result.path)
    for key in a:
        if a[key].is_floating_point():
            assert torch.equal(out[key], a[key] + 0.7 * (b[key] - c[key]))


def test_progress_counts_every_written_tensor(models, tmp_path):
    calls = []
    merge(models, tmp_path, progress=lambda done, total: calls.append((done, total)),
          primary_model_name="a", secondary_model_name="b")
    total = len(read_safetensors_header(models / "a.safetensors")) - 1
    assert calls[0] == (1, total) and calls[-1] == (total, total) and len(calls) == total


# --------------------------------------------------------------------------------------------- VAE, discard, EMA


def test_baked_vae_replaces_first_stage_and_discard_drops_names(models, tmp_path):
    a = tensors(models / "a.safetensors")
    vae = tensors(models / "tiny.vae.safetensors")
    result = merge(models, tmp_path, primary_model_name="a", interp_method="No interpolation",
                   bake_in_vae="tiny.vae.safetensors", discard_weights=r"^cond_stage_model\..*\.layers\.1\.")
    out = tensors(result.path)
    assert result.path.name == "a.safetensors"
    vae_keys = [k for k in a if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(out[k], vae[k.removeprefix("first_stage_model.")]) for k in vae_keys)
    assert not torch.equal(out[vae_keys[0]], a[vae_keys[0]])
    dropped = {k for k in a if k.startswith("cond_stage_model.") and ".layers.1." in k}
    assert dropped and out.keys() == a.keys() - dropped
    recipe = json.loads(result.metadata["sd_merge_recipe"])
    assert recipe["bake_in_vae"] == "tiny.vae.safetensors" and recipe["secondary_model_hash"] is None


def test_a_vae_that_does_not_fit_is_refused_before_writing(models, tmp_path):
    vaes = tmp_path / "vaes"
    make_flux_vae(vaes / "ae.safetensors", seed=1)
    make_flux_transformer(vaes / "flux.safetensors", seed=1)
    for name, message in (("ae.safetensors", "does not fit"), ("flux.safetensors", "not a VAE")):
        with pytest.raises(RequestError, match=f"bake_in_vae.*{message}"):
            merge(models, tmp_path, primary_model_name="a", interp_method="No interpolation",
                  bake_in_vae=str(vaes / name))
    assert not [p for p in tmp_path.iterdir() if p.is_file()]


def test_ema_weights_merge_like_a1111_or_are_discarded(models, tmp_path):
    root = tmp_path / "ema"
    root.mkdir()
    a = tensors(models / "a.safetensors")
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5, dtype=torch.int32),
           "model_ema.diffusion_modelinput_blocks00weight": a[CONV_IN] * 2}
    save_file(a | ema, str(root / "a.safetensors"), metadata={"format": "pt"})
    save_file(tensors(models / "b.safetensors"), str(root / "b.safetensors"))
    kept = merge(root, tmp_path, primary_model_name="a", secondary_model_name="b")
    out = tensors(kept.path)
    assert all(torch.equal(out[k], v) for k, v in ema.items())   # B has none: A's are kept, as in A1111
    assert any("not in B" in note and "model_ema." in note for note in kept.notes)
    gone = tensors(merge(root, tmp_path, primary_model_name="a", secondary_model_name="b", discard_ema=True,
                         custom_name="no-ema").path)
    assert not any(k.startswith("model_ema.") for k in gone) and gone.keys() == a.keys()


# --------------------------------------------------------------------------------------------- metadata


def test_metadata_is_written_as_a1111_writes_it(models, tmp_path):
    root = tmp_path / "meta"
    root.mkdir()
    save_file(tensors(models / "a.safetensors"), str(root / "a.safetensors"),
              metadata={"format": "pt", "ss_note": "from a", "shared": "a"})
    save_file(tensors(models / "b.safetensors"), str(root / "b.safetensors"), metadata={"shared": "b"})
    first = merge(root, root, primary_model_name="a", secondary_model_name="b", multiplier=0.25,
                  metadata_json='{"author": "me"}', custom_name="ab")
    header = read_safetensors_header(first.path)["__metadata__"]
    assert header == first.metadata
    assert header["format"] == "pt" and header["ss_note"] == "from a" and header["shared"] == "b"
    assert header["author"] == "me"
    recipe = json.loads(header["sd_merge_recipe"])
    a_info, b_info = (resolver(root)(n) for n in "ab")
    a_hash, b_hash = sha256_file(a_info.path), sha256_file(b_info.path)
    assert recipe == {
        "type": "webui", "primary_model_hash": a_hash, "secondary_model_hash": b_hash, "tertiary_model_hash": None,
        "interp_method": "Weighted sum", "multiplier": 0.25, "save_as_half": False, "custom_name": "ab",
        "config_source": 0, "bake_in_vae": "None", "discard_weights": "", "is_inpainting": False,
        "is_instruct_pix2pix": False}
    models_ = json.loads(header["sd_merge_models"])
    assert set(models_) == {a_hash, b_hash}
    assert models_[a_hash]["name"] == "a.safetensors" and len(models_[a_hash]["legacy_hash"]) == 8
    assert models_[a_hash]["sd_merge_recipe"] is None

    # merging the merge nests its recipe (as an object) and carries its models along
    again = merge(root, tmp_path, primary_model_name="ab", secondary_model_name="b", custom_name="again")
    nested = json.loads(again.metadata["sd_merge_models"])
    ab_hash = sha256_file(first.path)
    assert nested[ab_hash]["sd_merge_recipe"] == recipe
    assert {a_hash, b_hash, ab_hash} <= set(nested)

    bare = merge(root, tmp_path, primary_model_name="a", secondary_model_name="b", save_metadata=False,
                 custom_name="bare")
    assert "__metadata__" not in read_safetensors_header(bare.path) and bare.metadata == {}


# --------------------------------------------------------------------------------------------- names, files


def test_default_name_custom_name_and_no_overwrite(models, tmp_path):
    first = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b")
    assert first.path == tmp_path / "0.7(a) + 0.3(b).safetensors"
    with pytest.raises(RequestError, match="already exists"):
        merge(models, tmp_path, primary_model_name="a", secondary_model_name="b")
    before = first.path.stat().st_mtime_ns
    again = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=0.5,
                  custom_name="0.7(a) + 0.3(b)", overwrite=True)
    assert again.path == first.path and first.path.stat().st_mtime_ns != before
    named = merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", custom_name="mine.safetensors")
    assert named.path == tmp_path / "mine.safetensors"
    for bad in ("../escape", "/abs/name"):
        with pytest.raises(RequestError, match="custom_name"):
            merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", custom_name=bad)
    with pytest.raises(RequestError, match="would replace model A"):
        merge(models, models, primary_model_name="a", interp_method="No interpolation", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary files left


def test_a_full_disk_is_refused_before_writing(models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(RequestError, match="not enough disk space"):
        merge(models, tmp_path, primary_model_name="a", secondary_model_name="b")
    assert not list(tmp_path.iterdir())


def test_yaml_config_beside_a_is_copied(models, tmp_path):
    root = tmp_path / "cfg"
    root.mkdir()
    for n in "ab":
        (root / f"{n}.safetensors").symlink_to(models / f"{n}.safetensors")
    (root / "a.yaml").write_text("model: {}\n")
    result = merge(root, tmp_path, primary_model_name="a", secondary_model_name="b", custom_name="with-config")
    assert result.config_path == tmp_path / "with-config.yaml"
    assert result.config_path.read_text() == "model: {}\n"
    none = merge(root, tmp_path, primary_model_name="a", secondary_model_name="b", custom_name="no-config",
                 config_source=3)
    assert none.config_path is None and not (tmp_path / "no-config.yaml").exists()


def test_request_refusals_are_said_before_anything_runs():
    with pytest.raises(RequestError, match="never writes pickled"):
        build_request(MergeRequest, {"primary_model_name": "a", "secondary_model_name": "b",
                                     "checkpoint_format": "ckpt"})
    cases = [({}, "requires a primary model"),
             ({"primary_model_name": "a"}, "requires a secondary model"),
             ({"primary_model_name": "a", "secondary_model_name": "b", "interp_method": "Add difference"},
              "requires a tertiary model"),
             ({"primary_model_name": "a", "interp_method": "No interpolation", "discard_weights": "(["},
              "regular expression"),
             ({"primary_model_name": "a", "interp_method": "No interpolation", "metadata_json": "[1]"}, "JSON object"),
             ({"primary_model_name": "a", "interp_method": "No interpolation", "multipler": 0.5}, "multipler"),
             ({"primary_model_name": "a", "secondary_model_name": "b", "multiplier": 1.5}, "multiplier")]
    for values, message in cases:
        with pytest.raises(RequestError, match=message):
            build_request(MergeRequest, values)
    plain = MergeRequest(primary_model_name="a", interp_method="No interpolation", bake_in_vae=None)
    assert plain.bake_in_vae == "None"


# --------------------------------------------------------------------------------------------- shapes, families


def test_inpainting_a_merges_its_first_four_channels_and_the_reverse_is_refused(models, tmp_path):
    root = tmp_path / "inpaint"
    root.mkdir()
    a = tensors(models / "a.safetensors")
    b = tensors(models / "b.safetensors")
    wide = torch.randn(a[CONV_IN].shape[0], 9, *a[CONV_IN].shape[2:], generator=torch.Generator().manual_seed(7))
    save_file(a | {CONV_IN: wide}, str(root / "inp.safetensors"))
    (root / "b.safetensors").symlink_to(models / "b.safetensors")
    result = merge(root, tmp_path, primary_model_name="inp", secondary_model_name="b", multiplier=0.5)
    assert result.path.name == "0.5(inp) + 0.5(b).inpainting.safetensors"
    out = tensors(result.path)
    assert torch.equal(out[CONV_IN][:, :4], 0.5 * wide[:, :4] + 0.5 * b[CONV_IN])
    assert torch.equal(out[CONV_IN][:, 4:], wide[:, 4:])
    assert any("first 4 were merged" in n for n in result.notes)
    assert json.loads(result.metadata["sd_merge_recipe"])["is_inpainting"] is True
    with pytest.raises(RequestError, match="A must be the inpainting model"):
        merge(root, tmp_path, primary_model_name="b", secondary_model_name="inp")


def test_other_shape_mismatches_keep_a_and_are_listed(models, tmp_path):
    root = tmp_path / "mismatch"
    root.mkdir()
    a, b = tensors(models / "a.safetensors"), tensors(models / "b.safetensors")
    key = next(k for k in b if k.startswith("model.diffusion_model.") and k.endswith(".bias"))
    save_file(b | {key: torch.zeros(b[key].shape[0] + 1)}, str(root / "b.safetensors"))
    (root / "a.safetensors").symlink_to(models / "a.safetensors")
    result = merge(root, tmp_path, primary_model_name="a", secondary_model_name="b", multiplier=1)
    assert torch.equal(tensors(result.path)[key], a[key])
    assert any(key in note and "differ in shape" in note for note in result.notes)


def _fake_sdxl(path: Path) -> Path:
    """Just enough of an SDXL file for the family probe (its header is all the merger reads first)."""
    save_file({CONV_IN: torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}, str(path))
    return path


def test_different_families_are_refused(models, tmp_path):
    root = tmp_path / "families"
    root.mkdir()
    (root / "a.safetensors").symlink_to(models / "a.safetensors")
    _fake_sdxl(root / "xl.safetensors")
    make_flux_transformer(root / "flux.safetensors", seed=2)
    for other, label in (("xl", "SDXL"), ("flux", "FLUX")):
        with pytest.raises(RequestError, match=f"a SD1.x model, with model B .* a {label}"):
            merge(root, tmp_path, primary_model_name="a", secondary_model_name=other)
    (root / "v.safetensors").symlink_to(models / "tiny.vae.safetensors")
    with pytest.raises(RequestError, match="standalone VAE"):
        merge(root, tmp_path, primary_model_name="v", interp_method="No interpolation")
    assert not [p for p in tmp_path.iterdir() if p.is_file()]


def test_flux_transformer_file_merges_into_an_all_in_one_file(tmp_path):
    root = tmp_path / "flux"
    make_flux_checkpoint(root / "full.safetensors", seed=1)
    make_flux_transformer(root / "bare.safetensors", seed=2)
    full, bare = tensors(root / "full.safetensors"), tensors(root / "bare.safetensors")
    out = tensors(merge(root, tmp_path, primary_model_name="full", secondary_model_name="bare", multiplier=1).path)
    assert out.keys() == full.keys()
    prefix = "model.diffusion_model."
    assert all(torch.equal(out[prefix + k], v) for k, v in bare.items())
    assert all(torch.equal(out[k], v) for k, v in full.items() if not k.startswith(prefix))
    assert all(out[k].dtype == full[k].dtype for k in out)


# --------------------------------------------------------------------------------------------- memory, inputs, loading


def test_one_output_tensor_at_a_time_and_no_whole_file_reads(models, tmp_path, monkeypatch):
    """The merge holds no output tensor after writing it, and never loads an input whole."""
    written: list[weakref.ref] = []
    alive_at_write: list[int] = []
    real_write = SafetensorsWriter.write

    def recording_write(self, name, tensor):
        alive_at_write.append(sum(ref() is not None for ref in written))
        written.append(weakref.ref(tensor))
        real_write(self, name, tensor)

    def no_whole_file(*args, **kwargs):
        raise AssertionError("an input was loaded whole")

    monkeypatch.setattr(SafetensorsWriter, "write", recording_write)
    monkeypatch.setattr("studio.models.state_dict.load_file", no_whole_file)
    merge(models, tmp_path, primary_model_name="a", secondary_model_name="b", tertiary_model_name="c",
          interp_method="Add difference", multiplier=0.5)
    assert len(written) > 500 and max(alive_at_write) == 0


def test_ckpt_inputs_merge_and_the_result_loads_in_the_studio(models, tmp_path):
    root = tmp_path / "ckpt"
    make_checkpoint(root / "p.ckpt", "sd1", seed=2)
    (root / "a.safetensors").symlink_to(models / "a.safetensors")
    result = merge(root, tmp_path, primary_model_name="a", secondary_model_name="p", multiplier=0.5)
    merged = tensors(result.path)
    a = tensors(models / "a.safetensors")
    b = torch.load(root / "p.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(merged[CONV_IN], 0.5 * a[CONV_IN] + 0.5 * b[CONV_IN])

    policy = resolve_policy(device="cpu", no_half=True)
    model = load_checkpoint(CheckpointInfo(path=result.path, name=result.path.name), policy, tmp_path / "configs")
    assert model.probe.family == "sd1"
    assert torch.equal(model.unet.conv_in.weight, merged[CONV_IN])


def test_merger_module_keeps_a1111_skip_list():
    assert POSITION_IDS in merger_module.SKIP_ON_MERGE


# --------------------------------------------------------------------------------------------- UI


class _StubStudio:
    """What the tab uses of the studio facade, with the real merge behind it."""

    def __init__(self, root: Path, out: Path):
        self.root, self.out, self.requests = root, out, []
        self.vaes = type("Vaes", (), {"names": staticmethod(lambda: ["tiny.vae.safetensors"])})()

    def checkpoints(self):
        return [resolver(self.root)(n) for n in "abc"]

    def merge_checkpoints(self, req):
        self.requests.append(req)
        return merge_checkpoints(req, resolver(self.root), lambda n: self.root / n, self.out)

    def refresh_checkpoints(self):
        return self.checkpoints()

    def refresh_vaes(self):
        pass


def test_merger_tab_builds_and_merges_through_the_request_schema(models, tmp_path):
    import gradio as gr

    from studio.ui.merger import build_merger_tab, merge_from_values, read_models_metadata

    studio = _StubStudio(models, tmp_path)
    with gr.Blocks() as blocks, gr.Tabs():
        tab = build_merger_tab(studio)
    ids = {c.elem_id for c in blocks.blocks.values()}
    assert {"merger_primary", "merger_secondary", "merger_tertiary", "merger_method", "merger_multiplier",
            "merger_run", "merger_result"} <= ids
    assert tab.merged is not None

    text = merge_from_values(studio, {"primary_model_name": "a.safetensors", "secondary_model_name": "b",
                                      "tertiary_model_name": None, "interp_method": "Weighted sum",
                                      "multiplier": 0.5, "config_source": 0, "bake_in_vae": "None"})
    assert text.startswith("Checkpoint saved to ") and (tmp_path / "0.5(a) + 0.5(b).safetensors").is_file()
    assert "Error: " in merge_from_values(studio, {"primary_model_name": "a", "checkpoint_format": "ckpt"})
    assert "requires a secondary model" in merge_from_values(studio, {"primary_model_name": "a",
                                                                      "secondary_model_name": None})
    assert json.loads(read_models_metadata(studio, ["a.safetensors", None, None])) == {"format": "pt"}
