"""Checkpoint Merger tab (A1111's ``ui_checkpoint_merger.py``): three model pickers, the method, the
multiplier, the output options and the metadata options; Merge runs ``studio.merge_checkpoints`` (a
job on the studio's one queue) and says where the file went.

The tab's values go through :func:`merge_from_values` into the same
:class:`~studio.merge.MergeRequest` the API and the CLI build, validated by the same schema, so the
tests drive the tab without a browser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio.generation.request import build_request
from studio.merge import CONFIG_SOURCES, INTERP_METHODS, MergeRequest
from studio.merge.sources import read_metadata
from studio.ui.common import USER_ERRORS

if TYPE_CHECKING:
    from studio.core import Studio

NO_VAE = "None"


@dataclass
class MergerTab:
    """What app.py may chain to: ``merged`` is the Merge button's event, so the page's checkpoint
    dropdown can list the new file (``tab.merged.then(...)``)."""

    primary: gr.Dropdown
    secondary: gr.Dropdown
    tertiary: gr.Dropdown
    run: gr.Button
    result: gr.Textbox
    merged: Any


def checkpoint_titles(studio: Studio) -> list[str]:
    return [c.title for c in studio.checkpoints()]


def vae_names(studio: Studio) -> list[str]:
    return [NO_VAE, *studio.vaes.names()]


def merge_from_values(studio: Studio, values: dict[str, Any]) -> str:
    """Merge with the tab's values (MergeRequest field names); the text for the result box. A bad
    value or a refused merge is said there (in the schema's words), never raised."""
    values = {k: ("" if v is None and k.endswith("_name") else v) for k, v in values.items()}
    try:
        req = build_request(MergeRequest, values)  # type: ignore[arg-type]
        result = studio.merge_checkpoints(req)
    except USER_ERRORS as e:
        return f"Error: {e}"
    return "\n".join([result.message, *result.notes])


def read_models_metadata(studio: Studio, titles: list[str | None]) -> str:
    """A1111's "Read metadata from selected checkpoints": the three models' fields merged (A, then
    B, then C), as indented JSON for the metadata box."""
    by_title = {c.title: c for c in studio.checkpoints()}
    metadata: dict[str, Any] = {}
    for title in titles:
        info = by_title.get(title or "")
        if info is not None and not info.is_diffusers:
            metadata.update(read_metadata(info.path))
    return json.dumps(metadata, indent=4, ensure_ascii=False)


def build_merger_tab(studio: Studio) -> MergerTab:
    titles = checkpoint_titles(studio)
    fields = MergeRequest.model_fields
    with gr.Tab("Checkpoint Merger", id="modelmerger", elem_id="tab_modelmerger"), gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("A merger of the checkpoints you choose: the result goes to the first checkpoint folder.",
                        elem_id="merger_help")
            with gr.Row(equal_height=True):
                primary = gr.Dropdown(titles, value=None, label="Primary model (A)", elem_id="merger_primary")
                secondary = gr.Dropdown(titles, value=None, label="Secondary model (B)", elem_id="merger_secondary")
                tertiary = gr.Dropdown(titles, value=None, label="Tertiary model (C)", elem_id="merger_tertiary")
                refresh = gr.Button("↻", elem_id="merger_refresh", scale=0, min_width=48)
            custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="merger_custom_name")
            multiplier = gr.Slider(0, 1, value=fields["multiplier"].default, step=0.05,
                                   label="Multiplier (M) - set to 0 to get model A", elem_id="merger_multiplier")
            method = gr.Radio(list(INTERP_METHODS), value=fields["interp_method"].default,
                              label="Interpolation Method", elem_id="merger_method")
            with gr.Row():
                half = gr.Checkbox(False, label="Save as float16", elem_id="merger_save_as_half")
                overwrite = gr.Checkbox(False, label="Overwrite an existing file", elem_id="merger_overwrite")
            config_source = gr.Radio(list(CONFIG_SOURCES), value=CONFIG_SOURCES[0], type="index",
                                     label="Copy config from", elem_id="merger_config_source")
            with gr.Row(equal_height=True):
                vae = gr.Dropdown(vae_names(studio), value=NO_VAE, label="Bake in VAE", elem_id="merger_bake_in_vae")
                discard = gr.Textbox(label="Discard weights with matching name", elem_id="merger_discard_weights")
                discard_ema = gr.Checkbox(False, label="Discard EMA weights", elem_id="merger_discard_ema")
            with gr.Accordion("Metadata", open=False, elem_id="merger_metadata"):
                with gr.Row():
                    save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="merger_save_metadata")
                    add_recipe = gr.Checkbox(True, label="Add merge recipe metadata", elem_id="merger_add_recipe")
                    copy_fields = gr.Checkbox(True, label="Copy metadata from merged models",
                                              elem_id="merger_copy_metadata_fields")
                metadata_json = gr.Textbox("{}", label="Metadata in JSON format", lines=6,
                                           elem_id="merger_metadata_json")
                read_button = gr.Button("Read metadata from selected checkpoints", elem_id="merger_read_metadata")
            run = gr.Button("Merge", variant="primary", elem_id="merger_run")
        with gr.Column():
            result = gr.Textbox(label="Result", lines=8, interactive=False, elem_id="merger_result")

    inputs = {"primary_model_name": primary, "secondary_model_name": secondary, "tertiary_model_name": tertiary,
              "interp_method": method, "multiplier": multiplier, "save_as_half": half, "custom_name": custom_name,
              "config_source": config_source, "bake_in_vae": vae, "discard_weights": discard,
              "discard_ema": discard_ema, "save_metadata": save_metadata, "add_merge_recipe": add_recipe,
              "copy_metadata_fields": copy_fields, "metadata_json": metadata_json, "overwrite": overwrite}
    names = list(inputs)

    def merge(*values: Any) -> list[Any]:
        text = merge_from_values(studio, dict(zip(names, values, strict=True)))
        choices = checkpoint_titles(studio)   # the new file, once the studio has listed it
        return [*(gr.update(choices=choices) for _ in range(3)), text]

    def refresh_merger_lists() -> list[Any]:
        studio.refresh_checkpoints()
        studio.refresh_vaes()
        choices = checkpoint_titles(studio)
        return [*(gr.update(choices=choices) for _ in range(3)), gr.update(choices=vae_names(studio))]

    merged = run.click(merge, list(inputs.values()), [primary, secondary, tertiary, result])
    refresh.click(refresh_merger_lists, None, [primary, secondary, tertiary, vae], queue=False)
    read_button.click(lambda a, b, c: read_models_metadata(studio, [a, b, c]), [primary, secondary, tertiary],
                      metadata_json, queue=False)
    return MergerTab(primary, secondary, tertiary, run, result, merged)
