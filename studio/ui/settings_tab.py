"""Settings tab, laid out as A1111's: every option of the typed settings object
(studio.options.StudioOptions) in its section, drawn from its type and range, a search box that
narrows the page to the settings whose label or key match, and one "Apply settings" button.

Apply goes through the same validation as POST /sdapi/v1/options: a bad value is reported next to
its label and *nothing* is saved; otherwise the result line lists each setting that changed, old
value → new value, so the user sees what Apply did. Quicksettings (the options shown at the top of
the page) are placed when the page is built, so changing the list asks for a reload.

The Optimizations section holds the opt-in fast modes; each says what it costs (token merging
changes the image; torch.compile spends minutes compiling on first use).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import gradio as gr
from pydantic import ValidationError

from studio.errors import RequestError
from studio.generation.request import field_type
from studio.options import OPTIMIZATIONS, SAVING, UI, StudioOptions, sections
from studio.ui.bindings import control_for

if TYPE_CHECKING:
    from studio.core import Studio

# Set elsewhere on the page (the checkpoint, VAE and "VAE / Text Encoder" pickers, the Extensions tab), not here.
ELSEWHERE = frozenset({"sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "forge_additional_modules",
                       "disabled_extensions"})
# A1111 splits its saving options over three sections; options.py keeps them as one
SAVING_GRIDS, SAVING_PATHS, SAVING_DIRS, QUICKSETTINGS = (
    "Saving images/grids", "Paths for saving", "Saving to a directory", "Quicksettings")
TO_A_DIRECTORY = frozenset({"save_to_dirs", "grid_save_to_dirs", "directories_filename_pattern",
                            "directories_max_prompt_words"})
NOTES = {
    OPTIMIZATIONS: "Fast modes that trade something for speed: token merging changes the image; "
                   "torch.compile spends minutes compiling on first use (cached on disk). The device "
                   "policy (dtype, attention, memory layout) is chosen at start-up and shown in the footer.",
    SAVING_PATHS: "Relative folders are inside the data folder. Empty \"images\" / \"grids\" folders mean: "
                  "one folder per tab, as below.",
    SAVING_DIRS: "Patterns use A1111's tags: `[date]`, `[seed]`, `[prompt_words]`, `[model_name]`, `[steps]`…",
    QUICKSETTINGS: "The options shown at the top of the page, next to the checkpoint picker. They are placed "
                   "when the page is built: reload the page after changing them.",
}
# Never offered as quicksettings: the hash follows the checkpoint; list options (below) have no
# one-control form at the top of the page (the "VAE / Text Encoder" picker is always there)
NOT_QUICK = frozenset({"sd_checkpoint_hash"})


def _section(key: str, default: str) -> str:
    if key == "quicksettings_list":
        return QUICKSETTINGS
    if default != SAVING:
        return default
    if key.startswith("outdir_"):
        return SAVING_PATHS
    return SAVING_DIRS if key in TO_A_DIRECTORY else SAVING_GRIDS


def shown_options() -> dict[str, list[str]]:
    """Section title → the option keys the tab shows there, in A1111's order of sections."""
    out: dict[str, list[str]] = {SAVING_GRIDS: [], SAVING_PATHS: [], SAVING_DIRS: [], QUICKSETTINGS: []}
    for title, keys in sections().items():
        for key in keys:
            if key not in ELSEWHERE:
                out.setdefault(_section(key, title), []).append(key)
    return {title: keys for title, keys in out.items() if keys}


def label_of(key: str) -> str:
    info = StudioOptions.model_fields[key]
    return str((info.json_schema_extra or {}).get("label", key))  # type: ignore[union-attr]


def matching_keys(query: str) -> set[str]:
    """The shown options whose label, key or section contain every word of ``query`` (any case);
    every shown option for an empty query."""
    words = query.lower().split()
    out: set[str] = set()
    for title, keys in shown_options().items():
        for key in keys:
            text = f"{label_of(key)} {key} {title}".lower()
            if all(word in text for word in words):
                out.add(key)
    return out


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def _value(studio: Studio, key: str) -> Any:
    value = studio.settings.get(key)
    if key == "quicksettings_list":
        return list(value)
    return "" if value is None else value


def _normalise(key: str, value: Any) -> Any:
    """A control's value as the option's type: an emptied text box is "no value" for optional text."""
    info = StudioOptions.model_fields[key]
    if value == "" and info.default is None:
        return None
    if isinstance(value, float) and value.is_integer() and info.annotation is int:
        return int(value)
    if key == "quicksettings_list" and value is not None:
        return list(value)
    return value


def field_errors(changes: dict[str, Any], base: StudioOptions) -> dict[str, str]:
    """Option key → what is wrong with its new value (empty when ``changes`` are all valid)."""
    errors = {k: "must be a finite number" for k, v in changes.items() if isinstance(v, float) and not math.isfinite(v)}
    try:
        StudioOptions.model_validate({**base.model_dump(), **changes})
    except ValidationError as e:
        for item in e.errors():
            loc = item.get("loc") or ("options",)
            errors.setdefault(str(loc[0]), f"{item.get('msg')} (got {item.get('input')!r})")
    return errors


def show_value(value: Any) -> str:
    """A value as the result line shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "" or value == []:
        return "(empty)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def change_summary(before: dict[str, Any], after: dict[str, Any], keys: list[str]) -> str:
    """The result line for a saved Apply: each changed option's label and key, old → new."""
    changed = [k for k in keys if before.get(k) != after.get(k)]
    if not changed:
        return "Nothing changed."
    count = f"{len(changed)} setting{'s' if len(changed) != 1 else ''} changed"
    lines = [f"- {label_of(k)} (`{k}`): `{show_value(before.get(k))}` → `{show_value(after.get(k))}`"
             for k in changed]
    text = f"Saved — {count}:\n" + "\n".join(lines)
    if "quicksettings_list" in changed:
        text += ("\n\n**Quicksettings changed:** they are placed when the page is built — press "
                 "**Reload UI** to see them at the top of the page.")
    return text


def apply_settings(studio: Studio, values: dict[str, Any]) -> str:
    """Save the options that changed; Markdown for the result line (the changes, or each bad value
    with nothing saved). Never raises."""
    values = {k: _normalise(k, v) for k, v in values.items()}
    before = studio.settings.snapshot()
    changed = {k: v for k, v in values.items() if v != before.get(k)}
    if not changed:
        return "Nothing changed."
    errors = field_errors(changed, studio.settings.options)
    if errors:
        lines = [f"- {label_of(k) if k in StudioOptions.model_fields else k} (`{k}`): {msg}"
                 for k, msg in errors.items()]
        return "❌ Not saved — fix these and apply again:\n" + "\n".join(lines)
    try:
        studio.apply_options(changed)
    except RequestError as e:
        return f"❌ Not saved: {e}"
    return change_summary(before, studio.settings.snapshot(), sorted(changed, key=_order))


def _order(key: str) -> int:
    return list(StudioOptions.model_fields).index(key)


def quicksettings_choices(current: list[str]) -> list[tuple[str, str]]:
    """(label (key), key) for every option a quicksetting can show, by label, plus any listed now."""
    keys = [k for k, info in StudioOptions.model_fields.items()
            if k not in NOT_QUICK and not field_type(info.annotation)[1]]
    keys += [k for k in current if k not in keys]
    return sorted(((f"{label_of(k)} ({k})", k) for k in keys), key=lambda c: c[0].lower())


def _component(studio: Studio, key: str) -> Any:
    info = StudioOptions.model_fields[key]
    label = label_of(key)
    if key == "quicksettings_list":
        value = _value(studio, key)
        return gr.Dropdown(quicksettings_choices(value), value=value, multiselect=True, label=label,
                           elem_id=f"setting_{key}")
    return control_for(info, _value(studio, key), label, f"setting_{key}")


def _policy_text(studio: Studio) -> str:
    return f"Device policy: `{studio.policy.label}`"


def build_settings_tab(studio: Studio, tab: Any = None) -> None:
    """Fill the open ``gr.Tab``; when ``tab`` is given, its values are re-read each time it is
    selected, so a change made through the API since the page loaded is shown, not overwritten."""
    keys: list[str] = []
    components: list[Any] = []
    accordions: list[tuple[Any, list[str], bool]] = []   # (accordion, its keys, open by default)
    with gr.Row(equal_height=True):
        search = gr.Textbox(placeholder="Search settings (label or key)", show_label=False, container=False,
                            elem_id="settings_search", scale=4, min_width=200)
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=0, min_width=160)
        reload = gr.Button("Reload UI", elem_id="settings_reload_ui", scale=0, min_width=120)
    result = gr.Markdown("", elem_id="settings_result")
    policy_note: Any = None
    for title, section_keys in shown_options().items():
        is_open = title not in (UI, QUICKSETTINGS)
        with gr.Accordion(title, open=is_open, elem_id=f"settings_{slug(title)}") as accordion:
            if title in NOTES:
                gr.Markdown(NOTES[title])
            if title == OPTIMIZATIONS:
                # the policy is resolved on first use (it imports torch): shown when the tab is opened
                policy_note = gr.Markdown(_policy_text(studio) if tab is None else "Device policy: …",
                                          elem_id="settings_policy")
            made: list[str] = []
            for key in section_keys:
                component = _component(studio, key)
                if component is not None:
                    keys.append(key)
                    components.append(component)
                    made.append(key)
        accordions.append((accordion, made, is_open))

    def on_apply(*values: Any) -> str:
        return apply_settings(studio, dict(zip(keys, values)))

    def on_search(query: str) -> list[Any]:
        found = matching_keys(query or "")
        searching = bool((query or "").strip())
        shown = [gr.update(visible=key in found) for key in keys]
        sections_shown = [gr.update(visible=any(k in found for k in section), open=searching or is_open)
                          for _acc, section, is_open in accordions]
        return [*shown, *sections_shown]

    apply.click(on_apply, inputs=components, outputs=result)
    search.change(on_search, search, [*components, *(a for a, _k, _o in accordions)], queue=False,
                  show_progress="hidden")
    # quicksettings are read when the page is built; a reload shows the new ones
    reload.click(None, js="() => { window.location.reload(); }")
    if tab is not None:
        notes = [policy_note] if policy_note is not None else []
        tab.select(lambda: [*(_value(studio, k) for k in keys), *(_policy_text(studio) for _ in notes)],
                   outputs=[*components, *notes])
