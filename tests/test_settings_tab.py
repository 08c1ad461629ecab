"""Settings tab (A1111's): sections, search, quicksettings as a multiselect, and Apply that says
exactly what it changed, or which values are wrong and that nothing was saved."""

from __future__ import annotations

import json

import gradio as gr
import pytest

from studio.config import Flags
from studio.core import Studio
from studio.options import DEFAULTS, StudioOptions
from studio.ui.settings_tab import (
    ELSEWHERE,
    _value,
    apply_settings,
    build_settings_tab,
    matching_keys,
    quicksettings_choices,
    shown_options,
)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    s = Studio.create(Flags(data_dir=str(root), no_half=True, no_demo=True))
    yield s
    s.queue.shutdown()


@pytest.fixture
def fresh(studio):
    """The studio with every option at its default again afterwards."""
    yield studio
    studio.settings.update({k: v for k, v in DEFAULTS.items() if studio.settings.get(k) != v})


def page_values(studio):
    """What the tab's controls send on Apply when the user touched nothing."""
    return {key: _value(studio, key) for keys in shown_options().values() for key in keys}


def saved(studio):
    path = studio.settings.path
    return json.loads(path.read_text()) if path.exists() else {}


def test_sections_follow_a1111_and_show_every_option_once():
    shown = shown_options()
    assert list(shown)[:4] == ["Saving images/grids", "Paths for saving", "Saving to a directory", "Quicksettings"]
    assert set(shown["Paths for saving"]) == {k for k in StudioOptions.model_fields if k.startswith("outdir_")}
    assert {"save_to_dirs", "directories_filename_pattern"} <= set(shown["Saving to a directory"])
    assert {"samples_filename_pattern", "grid_save", "n_rows", "grid_format"} <= set(shown["Saving images/grids"])
    assert shown["Quicksettings"] == ["quicksettings_list"]
    listed = [k for keys in shown.values() for k in keys]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(StudioOptions.model_fields) - ELSEWHERE


def test_apply_lists_exactly_the_changed_settings_old_to_new(fresh):
    values = page_values(fresh)
    values.update(jpeg_quality=90.0, samples_filename_pattern="[seed]-[prompt_words]", save_to_dirs=False)
    text = apply_settings(fresh, values)
    assert text.startswith("Saved — 3 settings changed:"), text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == [
        "- Images filename pattern (empty = [seed]) (`samples_filename_pattern`): `(empty)` → "
        "`[seed]-[prompt_words]`",
        "- Quality for saved jpeg and webp images (`jpeg_quality`): `80` → `90`",
        "- Save images to a subdirectory (`save_to_dirs`): `on` → `off`",
    ]
    assert "Reload UI" not in text
    stored = saved(fresh)
    assert stored["jpeg_quality"] == 90 and stored["save_to_dirs"] is False
    assert stored["samples_filename_pattern"] == "[seed]-[prompt_words]"
    # the same page applied again changes nothing
    assert apply_settings(fresh, {**values}) == "Nothing changed."
    one = apply_settings(fresh, {**values, "outdir_txt2img_samples": "renders/t2i"})
    assert one.startswith("Saved — 1 setting changed:") and "`outputs/txt2img-images` → `renders/t2i`" in one


def test_untouched_page_and_normalised_values_change_nothing(fresh):
    before = saved(fresh)
    assert apply_settings(fresh, page_values(fresh)) == "Nothing changed."
    assert apply_settings(fresh, {**page_values(fresh), "samples_format": "PNG"}) == "Nothing changed."
    assert saved(fresh) == before


def test_bad_values_are_named_per_field_and_nothing_is_saved(fresh):
    values = page_values(fresh)
    before_file, before = saved(fresh), fresh.settings.snapshot()
    values.update(jpeg_quality=500, grid_background_color="red", outdir_grids="grids-elsewhere",
                  token_merging_ratio=float("nan"))
    text = apply_settings(fresh, values)
    assert text.startswith("❌ Not saved"), text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(lines) == 3, text
    assert any("(`jpeg_quality`)" in line and "less than or equal to 100" in line for line in lines)
    assert any("(`grid_background_color`)" in line and "'red'" in line for line in lines)
    assert any("(`token_merging_ratio`)" in line and "finite" in line for line in lines)
    assert "outdir_grids" not in text
    assert fresh.settings.snapshot() == before and saved(fresh) == before_file, "a refused Apply saves nothing"


def test_search_filters_by_label_key_and_section():
    everything = {k for keys in shown_options().values() for k in keys}
    assert matching_keys("") == everything == matching_keys("   ")
    assert matching_keys("JPEG") == {"jpeg_quality"}
    assert matching_keys("clip_stop") == {"CLIP_stop_at_last_layers"}     # by key, any case
    assert matching_keys("clip skip") == {"CLIP_stop_at_last_layers"}     # by label, every word
    assert {"samples_filename_pattern", "directories_filename_pattern"} <= matching_keys("pattern")
    assert matching_keys("paths for saving") == {k for k in everything if k.startswith("outdir_")}
    assert matching_keys("no such setting anywhere") == set()


def test_quicksettings_multiselect_offers_labels_and_saves(fresh):
    choices = quicksettings_choices(["sd_model_checkpoint"])
    keys = [key for _label, key in choices]
    assert ("Clip skip (CLIP_stop_at_last_layers)", "CLIP_stop_at_last_layers") in choices
    assert "sd_model_checkpoint" in keys and "sd_vae" in keys
    assert not {"quicksettings_list", "disabled_extensions", "forge_additional_modules",
                "sd_checkpoint_hash"} & set(keys), "no one-control form for these at the top"
    assert [c[0].lower() for c in choices] == sorted(c[0].lower() for c in choices)

    values = page_values(fresh)
    values["quicksettings_list"] = ["sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"]
    text = apply_settings(fresh, values)
    assert "(`quicksettings_list`): `sd_model_checkpoint` → `sd_model_checkpoint, CLIP_stop_at_last_layers, " \
           "sd_vae`" in text
    assert "Reload UI" in text
    assert saved(fresh)["quicksettings_list"] == ["sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"]
    bad = apply_settings(fresh, {**values, "quicksettings_list": ["sd_vae", "not_an_option"]})
    assert bad.startswith("❌") and "not_an_option" in bad
    assert fresh.settings.get("quicksettings_list")[1] == "CLIP_stop_at_last_layers"


def _by_id(blocks):
    return {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


def test_tab_has_the_ids_the_page_and_tests_use_and_search_hides_controls(studio):
    with gr.Blocks() as blocks, gr.Tab("Settings") as tab:
        build_settings_tab(studio, tab)
    ids = _by_id(blocks)
    for elem in ("settings_submit", "settings_result", "settings_search", "settings_reload_ui", "settings_policy",
                 "settings_saving_images_grids", "settings_paths_for_saving", "settings_quicksettings"):
        assert elem in ids, elem
    shown = {k for keys in shown_options().values() for k in keys}
    assert {f"setting_{k}" for k in shown if k != "forge_additional_modules"} <= set(ids)
    quick = ids["setting_quicksettings_list"]
    assert quick.multiselect and ("Clip skip (CLIP_stop_at_last_layers)", "CLIP_stop_at_last_layers") in [
        tuple(c) for c in quick.choices]

    search = ids["settings_search"]
    dep = next(d for d in blocks.fns.values() if any(t[0] == search._id for t in d.targets))
    updates = dep.fn("jpeg")
    outputs = dep.outputs
    visible = {o.elem_id: u.get("visible") for o, u in zip(outputs, updates)}
    assert visible["setting_jpeg_quality"] is True
    assert visible["setting_samples_format"] is False
    assert visible["settings_saving_images_grids"] is True and visible["settings_paths_for_saving"] is False
    cleared = {o.elem_id: u.get("visible") for o, u in zip(outputs, dep.fn(""))}
    assert all(cleared.values())
