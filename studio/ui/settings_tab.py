"""Settings tab: every option of the typed settings object (studio.options.StudioOptions), grouped
in its sections, each drawn from its type and range, with one Apply button. Values go through
the same validation as POST /sdapi/v1/options, so a bad value is refused with a message and
nothing is saved; the result line says what changed.

The Optimizations section holds the opt-in fast modes; each says what it costs (token merging
changes the image; torch.compile spends minutes compiling on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from studio.errors import RequestError
from studio.options import OPTIMIZATIONS, StudioOptions, sections
from studio.ui.bindings import control_for

if TYPE_CHECKING:
    from studio.core import Studio

# Set elsewhere on the page (the checkpoint, VAE and "VAE / Text Encoder" pickers, the Extensions tab), not here.
ELSEWHERE = frozenset({"sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "forge_additional_modules",
                       "disabled_extensions"})
NOTES = {OPTIMIZATIONS: "Fast modes that trade something for speed: token merging changes the image; "
                        "torch.compile spends minutes compiling on first use (cached on disk). The device "
                        "policy (dtype, attention, memory layout) is chosen at start-up and shown in the footer."}


def shown_options() -> dict[str, list[str]]:
    return {title: [k for k in keys if k not in ELSEWHERE] for title, keys in sections().items()}


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
    return value


def apply_settings(studio: Studio, values: dict[str, Any]) -> str:
    """Save the options that changed; a Markdown message for the result line. Never raises."""
    values = {k: _normalise(k, v) for k, v in values.items()}
    changed = {k: v for k, v in values.items() if v != studio.settings.get(k)}
    if not changed:
        return "Nothing changed."
    try:
        studio.apply_options(changed)
    except RequestError as e:
        return f"❌ Not saved: {e}"
    return "Saved: " + ", ".join(f"{k} = {v!r}" for k, v in sorted(changed.items())) + "."


def _component(studio: Studio, key: str) -> Any:
    info = StudioOptions.model_fields[key]
    label = (info.json_schema_extra or {}).get("label", key)  # type: ignore[union-attr]
    if key == "quicksettings_list":
        return gr.Dropdown(sorted(StudioOptions.model_fields), value=_value(studio, key), multiselect=True,
                           label=label, elem_id=f"setting_{key}")
    return control_for(info, _value(studio, key), label, f"setting_{key}")


def build_settings_tab(studio: Studio, tab: Any = None) -> None:
    """Fill the open ``gr.Tab``; when ``tab`` is given, its values are re-read each time it is
    selected, so a change made through the API since the page loaded is shown, not overwritten."""
    keys: list[str] = []
    components: list[Any] = []
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=0, min_width=160)
        result = gr.Markdown("", elem_id="settings_result")
    for title, section_keys in shown_options().items():
        with gr.Accordion(title, open=title != "User interface",
                          elem_id=f"settings_{title.lower().replace(' ', '_')}"):
            if title in NOTES:
                gr.Markdown(NOTES[title])
            if title == OPTIMIZATIONS:
                gr.Markdown(f"Device policy: `{studio.policy.label}`", elem_id="settings_policy")
            for key in section_keys:
                component = _component(studio, key)
                if component is not None:
                    keys.append(key)
                    components.append(component)

    def on_apply(*values: Any) -> str:
        return apply_settings(studio, dict(zip(keys, values)))

    apply.click(on_apply, inputs=components, outputs=result)
    if tab is not None:
        tab.select(lambda: [_value(studio, k) for k in keys], outputs=components)
