"""The Gradio Blocks app: checkpoint bar, tabs, footer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from studio import __version__
from studio.core import Studio
from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.outputs import ImageReadError, open_image, read_infotext
from studio.models.modules import ModuleFile
from studio.ui.common import GenerationTab
from studio.ui.controlnet import CONTROLNET_CSS, build_controlnet_tab, paste_updates
from studio.ui.extensions_tab import build_extensions_tab
from studio.ui.extra_networks import checkpoint_card_title
from studio.ui.extras import build_extras_tab
from studio.ui.img2img import build_img2img_tab, build_inpaint_tab
from studio.ui.merger import build_merger_tab
from studio.ui.settings_tab import build_settings_tab
from studio.ui.train import build_train_tab
from studio.ui.txt2img import USER_ERRORS, build_txt2img_tab, fields_to_send, fields_to_updates

CSS = """
.studio-progress {position: relative; height: 26px; border-radius: 6px; overflow: hidden;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary);}
.studio-progress .bar {position: absolute; top: 0; left: 0; bottom: 0; background: var(--color-accent);
  opacity: .35; transition: width .2s;}
.studio-progress span {position: relative; padding-left: 8px; line-height: 26px; font-size: 13px;}
#demo_banner {border: 1px solid #d97706; background: #fff7ed; color: #7c2d12; border-radius: 8px;
  padding: 4px 12px;}
.prompt-box {position: relative; gap: 0 !important;}
.token-box {position: absolute !important; top: 6px; right: 12px; z-index: 5; width: auto !important;
  min-width: 0 !important; padding: 0 !important; border: none !important; background: none !important;}
.token-counter {font-size: 12px; opacity: .75; white-space: nowrap;}
.token-counter.over {color: #dc2626; opacity: 1;}
.token-counter .over {color: #dc2626;}
#studio_footer {text-align: center; opacity: .7; font-size: 12px;}
.extensions-table {width: 100%; border-collapse: collapse; font-size: 13px;}
.extensions-table th, .extensions-table td {text-align: left; padding: 6px 8px; vertical-align: top;
  border-bottom: 1px solid var(--border-color-primary); overflow-wrap: anywhere;}
.extensions-table tr.ext-error td {color: #b91c1c;}
.extensions-table tr.ext-disabled td {opacity: .6;}
.extra-network-cards .caption-label {font-size: 12px;}
/* fixed-size cards: Gradio stretches a gallery's few items across its whole width */
.extra-network-cards .grid-container {grid-template-columns: repeat(auto-fill, minmax(140px, 160px)) !important;}
.extra-network-cards .thumbnail-item {aspect-ratio: 4 / 5 !important; height: auto !important;}
""" + CONTROLNET_CSS


def demo_banner_text(studio: Studio) -> str:
    folder = studio.paths.ckpt_dirs[0]
    if not any(c.is_demo for c in studio.checkpoints()):
        return ""
    return (
        "**Demo model.** No checkpoint was found, so the studio offers its built-in demo model "
        "(tiny, random weights: it makes abstract images, not pictures). Put your SD 1.x, SD 2.x or "
        f"SDXL `.safetensors` / `.ckpt` files in `{folder}` and press ↻."
    )


# How the module picker names each kind of separate file (Forge's "VAE / Text Encoder" list).
MODULE_KIND_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL", "qwen3": "Qwen3", "vae16": "VAE",
                      "vae32": "FLUX.2 VAE", "vae4": "VAE"}


def module_choices(modules: Sequence[ModuleFile], chosen: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The "VAE / Text Encoder" multiselect's (label, file name) choices and its value. The option may
    hold what Forge saves (full paths) or names and stems: each is shown as the file it picks; one that
    picks nothing stays listed as not found, so the user sees it and can remove it."""
    choices = [(f"{m.name} ({MODULE_KIND_LABELS.get(m.kind, m.kind)}, {m.storage})", m.name) for m in modules]
    value: list[str] = []
    for entry in chosen:
        match = next((m.name for m in modules if entry in _module_aliases(m)), None)
        if match is None:
            choices.append((f"{entry} (not found)", entry))
            match = entry
        if match not in value:
            value.append(match)
    return choices, value


def _module_aliases(module: ModuleFile) -> set[str]:
    base = module.name.rsplit("/", 1)[-1]
    return {str(module.path), module.name, base, module.name.rsplit(".", 1)[0], base.rsplit(".", 1)[0]}


def module_picker_update(studio: Studio) -> Any:
    """The picker rescanned: the module folders as they are now, the option as it is now."""
    choices, value = module_choices(studio.engine.models.modules(), studio.settings.options.forge_additional_modules)
    return gr.update(choices=choices, value=value)


def build_module_picker(studio: Studio) -> gr.Dropdown:
    """Forge's "VAE / Text Encoder" multiselect: the separate text encoders and VAEs that complete an
    SD3/FLUX checkpoint lacking them. Saved to ``forge_additional_modules`` as quicksettings are; the
    next generation loads with it."""
    choices, value = module_choices(studio.engine.models.modules(), studio.settings.options.forge_additional_modules)
    picker = gr.Dropdown(choices=choices, value=value, multiselect=True, label="VAE / Text Encoder",
                         elem_id="setting_forge_additional_modules", scale=4, min_width=200)

    def apply(names: list[str] | None) -> Any:
        try:
            studio.apply_options({"forge_additional_modules": list(names or [])})
        except USER_ERRORS as e:
            gr.Warning(str(e))
            return module_picker_update(studio)
        return gr.update()

    picker.input(apply, picker, picker, queue=False, show_progress="hidden")
    return picker


def follow_model(studio: Studio, tabs: Sequence[GenerationTab], data: dict[Any, Any], apply_presets: bool,
                 from_flow: bool = False) -> list[Any]:
    """Updates for every tab's :meth:`GenerationTab.outputs` after a model was (or was not) loaded."""
    return [u for tab in tabs for u in tab.updates(studio, data, apply_presets, from_flow)]


def build_ui(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="Studio", analytics_enabled=False) as blocks:
        with gr.Row(equal_height=True):
            checkpoint = gr.Dropdown(
                choices=[c.title for c in studio.checkpoints()], value=studio.current_title,
                label="Stable Diffusion checkpoint", elem_id="setting_sd_model_checkpoint", scale=6,
            )
            refresh = gr.Button("↻", elem_id="refresh_sd_model_checkpoint", scale=0, min_width=48)
            vae = gr.Dropdown(choices=studio.vae_choices(), value=studio.settings.get("sd_vae", "Automatic"),
                              label="SD VAE", elem_id="setting_sd_vae", scale=3)
            modules = build_module_picker(studio)
            build_quicksettings(studio)
            model_status = gr.Markdown(_model_status(studio), elem_id="model_status")
        switched = gr.State(False)  # whether the last checkpoint choice loaded (its presets then apply)
        banner = gr.Markdown(demo_banner_text(studio), elem_id="demo_banner",
                             visible=bool(demo_banner_text(studio)))

        with gr.Tabs(elem_id="tabs") as tabs:
            controls = build_txt2img_tab(studio)
            followers = [controls.follows_model, build_img2img_tab(studio), build_inpaint_tab(studio)]
            with gr.Tab("ControlNet", id="controlnet", elem_id="tab_controlnet"):
                build_controlnet_tab(studio)
            build_extras_tab(studio)
            merger = build_merger_tab(studio)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"), gr.Row(equal_height=False):
                with gr.Column():
                    upload = gr.File(label="Image (PNG, JPEG or WebP)", file_types=["image"],
                                     elem_id="pnginfo_image", type="filepath")
                    shown = gr.Image(label="Image", interactive=False, elem_id="pnginfo_preview", height=320)
                with gr.Column():
                    text = gr.Textbox(label="Parameters", lines=8, interactive=False,
                                      elem_id="pnginfo_generation_info")
                    message = gr.Markdown("", elem_id="pnginfo_message")
                    send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                build_train_tab(studio)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings") as settings_tab:
                build_settings_tab(studio, settings_tab)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                build_extensions_tab(studio)

        gr.Markdown(f"Studio {__version__} · {studio.policy.label} · API: /sdapi/v1 · docs: /docs",
                    elem_id="studio_footer")

        def choose(title):
            before = studio.models.current
            try:
                studio.select_checkpoint(title)
                # "from_flow": leaving a FLUX/SD3 model for an SD one brings the SD defaults back
                from_flow = before is not None and before.spec.is_flow and not studio.models.current.spec.is_flow
                status, loaded = _model_status(studio), "from_flow" if from_flow else True
            except USER_ERRORS as e:
                gr.Warning(str(e))
                status, loaded = f"⚠️ {e}", False
            # the choices again: a file this load hashed is now titled with its hash
            titles = [c.title for c in studio.checkpoints()]
            return gr.update(choices=titles, value=studio.current_title), status, loaded

        follow_inputs = {c for tab in followers for c in tab.inputs()} | {switched}
        follow_outputs = [c for tab in followers for c in tab.outputs()]

        def after_choice(data):
            # Forge: a newly chosen checkpoint brings its family's presets; a failed choice changes nothing
            return follow_model(studio, followers, data, apply_presets=bool(data[switched]),
                                from_flow=data[switched] == "from_flow")

        def after_page_load(data):
            # a fresh page starts from the SD defaults: bring the loaded model's presets back
            return follow_model(studio, followers, data, apply_presets=True)

        def do_refresh():
            studio.refresh_checkpoints()
            studio.refresh_vaes()
            text = demo_banner_text(studio)
            return (gr.update(choices=[c.title for c in studio.checkpoints()], value=studio.current_title),
                    gr.update(value=text, visible=bool(text)), gr.update(choices=studio.vae_choices()),
                    module_picker_update(studio))

        def choose_vae(name):
            try:
                studio.select_vae(name)
            except USER_ERRORS as e:
                gr.Warning(str(e))
                return gr.update(value=studio.settings.get("sd_vae", "Automatic"))
            return gr.update(value=name)

        vae.select(choose_vae, vae, vae)

        def choose_card(names, evt: gr.SelectData):
            title = checkpoint_card_title(studio, names, evt.index)
            if title is None:
                return gr.update(), gr.update(), False
            return choose(title)

        controls.extra.galleries["checkpoints"].select(
            choose_card, controls.extra.shown, [checkpoint, model_status, switched]
        ).then(after_choice, follow_inputs, follow_outputs, queue=False, show_progress="hidden")
        blocks.load(lambda: controls.extra.fill(""), None,
                    [*controls.extra.galleries.values(), controls.extra.shown], queue=False)

        checkpoint.select(choose, checkpoint, [checkpoint, model_status, switched]).then(
            after_choice, follow_inputs, follow_outputs, queue=False, show_progress="hidden")
        # The first model loads in the background: a page opened meanwhile polls until it is
        # there, then the timer switches itself off.
        watcher = gr.Timer(1.0)

        def sync():
            loading = studio.models.current is None and studio.queue.current is not None
            return (gr.update(choices=[c.title for c in studio.checkpoints()], value=studio.current_title),
                    _model_status(studio), gr.Timer(active=loading))

        blocks.load(sync, None, [checkpoint, model_status, watcher], queue=False).then(
            after_page_load, follow_inputs, follow_outputs, queue=False, show_progress="hidden")
        # the tick that finds the first model loaded is the last one: its presets apply then
        watcher.tick(sync, None, [checkpoint, model_status, watcher], queue=False, show_progress="hidden").then(
            after_page_load, follow_inputs, follow_outputs, queue=False, show_progress="hidden")
        refresh.click(do_refresh, None, [checkpoint, banner, vae, modules])
        # a merged checkpoint is in the dropdown at once (A1111 lists it after a merge)
        merger.merged.then(lambda: gr.update(choices=[c.title for c in studio.checkpoints()]), None, checkpoint,
                           queue=False, show_progress="hidden")

        def read_png(path):
            if not path:
                return None, "", ""
            try:
                image = open_image(Path(path).read_bytes())
            except (ImageReadError, OSError) as e:
                return None, "", f"**Error:** {e}"
            info = read_infotext(image)
            return image.convert("RGB"), info or "", "" if info else "_No generation parameters in this image._"

        upload.change(read_png, upload, [shown, text, message])

        def send_to_txt2img(info):
            params = parse_infotext(info) if info else {}
            fields = fields_to_send(infotext_to_fields(params), studio.settings.options)
            return [*fields_to_updates(controls, fields), *paste_updates(controls.controlnet, params),
                    gr.Tabs(selected="txt2img")]

        send.click(send_to_txt2img, text,
                   [controls.prompt, controls.negative, controls.steps, controls.sampler, controls.schedule,
                    controls.cfg, controls.seed, controls.width, controls.height, controls.clip_skip,
                    controls.distilled, *controls.controlnet.inputs(), tabs])
    return blocks


def build_quicksettings(studio: Studio) -> list[Any]:
    """A1111's ``quicksettings_list``: the options it names, at the top of the page, applied as soon as
    they change (the checkpoint and VAE pickers are always there). Read when the page is built."""
    from studio.options import StudioOptions
    from studio.ui.bindings import control_for

    made = []
    for key in studio.settings.options.quicksettings_list:
        if key in ("sd_model_checkpoint", "sd_vae", "sd_checkpoint_hash"):
            continue
        info = StudioOptions.model_fields[key]
        label = (info.json_schema_extra or {}).get("label", key)  # type: ignore[union-attr]
        value = studio.settings.get(key)
        component = control_for(info, "" if value is None else value, label, f"quicksettings_{key}")
        if component is None:
            continue

        def apply(value: Any, key: str = key, optional: bool = info.default is None) -> None:
            try:
                studio.apply_options({key: None if value == "" and optional else value})
            except USER_ERRORS as e:
                gr.Warning(str(e))

        component.change(apply, component, None, queue=False, show_progress="hidden")
        made.append(component)
    return made


def _model_status(studio: Studio) -> str:
    current = studio.models.current
    if current is None:
        busy = studio.queue.current
        return "_Loading model…_" if busy and busy.description == "initial model load" else "_No model loaded._"
    return f"{current.label}" + (" · **demo**" if current.info.is_demo else "")
