"""The Gradio Blocks app: checkpoint bar, tabs, footer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from studio import __version__
from studio.core import Studio
from studio.generation.outputs import ImageReadError, open_image, read_infotext
from studio.models.modules import ModuleFile
from studio.ui.common import GenerationTab
from studio.ui.controlnet import CONTROLNET_CSS, build_controlnet_tab, paste_updates
from studio.ui.extensions_tab import build_extensions_tab
from studio.ui.extra_networks import checkpoint_card_title
from studio.ui.extras import build_extras_tab
from studio.ui.history import HISTORY_CSS, build_history_tab
from studio.ui.img2img import build_img2img_tab, build_inpaint_tab
from studio.ui.merger import build_merger_tab
from studio.ui.output_actions import may_open_folders, open_folder, samples_folder, save_chosen, zip_gallery
from studio.ui.send_to import Receiver, editor_value, gallery_pick, send_handler
from studio.ui.settings_tab import build_settings_tab
from studio.ui.train import build_train_tab
from studio.ui.txt2img import USER_ERRORS, build_txt2img_tab, hires_components, hires_updates
from studio.ui.workers_panel import CSS as WORKERS_CSS
from studio.ui.workers_panel import build_workers_tab

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
/* A1111's layout: Generate at the right of the prompts, big; Interrupt | Skip under it */
.gen-toolbar .gen-button {min-height: 72px !important; font-size: 20px !important;}
.gen-stop-row {gap: 6px !important;}
.gen-stop-row button {min-width: 0 !important;}
.gen-style-row {gap: 6px !important;}
.studio-progress.idle {visibility: hidden;}
/* a long value (a checkpoint title with its [hash] on a phone) ends in "…" before the dropdown's arrow,
   which Gradio lays over the input's right end */
.wrap-inner > .secondary-wrap > input {text-overflow: ellipsis; padding-right: 22px !important;}
.gen-send-row {gap: 6px !important; flex-wrap: wrap !important;}
.gen-send-row button {flex: 1 1 auto !important; min-width: 70px !important;}
/* Gradio 6 appends a selected tab it wrongly measured as overflowing a second time: show it once */
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=txt2img] ~ [data-tab-id=txt2img],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=img2img] ~ [data-tab-id=img2img],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=inpaint] ~ [data-tab-id=inpaint],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=controlnet] ~ [data-tab-id=controlnet],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=extras] ~ [data-tab-id=extras],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=modelmerger] ~ [data-tab-id=modelmerger],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=pnginfo] ~ [data-tab-id=pnginfo],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=history] ~ [data-tab-id=history],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=train] ~ [data-tab-id=train],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=settings] ~ [data-tab-id=settings],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=extensions] ~ [data-tab-id=extensions],
#tabs > .tab-wrapper > [role=tablist] > [data-tab-id=workers] ~ [data-tab-id=workers] {display: none !important;}
/* phones: the result right after the prompt, the parameters below it */
@media (max-width: 900px) {
  .gen-main {flex-direction: column !important;}
  .gen-main > .gen-results {order: -1;}
}
""" + CONTROLNET_CSS + HISTORY_CSS + WORKERS_CSS


def demo_banner_text(studio: Studio) -> str:
    """Shown while the built-in demo is the only model there is."""
    folder = studio.paths.ckpt_dirs[0]
    checkpoints = studio.checkpoints()
    if not checkpoints or not all(c.is_demo for c in checkpoints):
        return ""
    return (
        "**Demo model.** No checkpoint was found, so the studio offers its built-in demo model "
        "(tiny, random weights: it makes abstract images, not pictures; it starts at 256×256 and 8 steps, "
        "so a picture comes in seconds). Put your SD 1.x, SD 2.x, SDXL, SD3 or FLUX `.safetensors` / `.ckpt` / "
        f"`.gguf` files in `{folder}`: they appear by themselves. Real checkpoints work at 512–1024 px and 20+ "
        "steps."
    )


def checkpoint_update(studio: Studio) -> Any:
    """The checkpoint dropdown as it must be: every title (with its hash once known) and the loaded
    one selected; a value missing from the choices would show as blank."""
    titles = [c.title for c in studio.checkpoints()]
    value = studio.current_title
    if value is not None and value not in titles:
        titles.append(value)
    return gr.update(choices=titles, value=value)


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

            @gr.render(triggers=[blocks.load])
            def quicksettings():   # drawn per page load: the Settings tab may have changed the list
                build_quicksettings(studio)

            model_status = gr.Markdown(_model_status(studio), elem_id="model_status")
        switched = gr.State(False)  # whether the last checkpoint choice loaded (its presets then apply)
        banner = gr.Markdown(demo_banner_text(studio), elem_id="demo_banner",
                             visible=bool(demo_banner_text(studio)))

        with gr.Tabs(elem_id="tabs") as tabs:
            controls = build_txt2img_tab(studio)
            img2img, inpaint = build_img2img_tab(studio), build_inpaint_tab(studio)
            followers = [controls.follows_model, img2img, inpaint]
            with gr.Tab("ControlNet", id="controlnet", elem_id="tab_controlnet"):
                controlnet_out = build_controlnet_tab(studio)
            extras_image = build_extras_tab(studio)
            merger = build_merger_tab(studio)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"), gr.Row(equal_height=False):
                with gr.Column():
                    upload = gr.File(label="Image (PNG, JPEG or WebP)", file_types=["image"],
                                     elem_id="pnginfo_image", type="filepath")
                    shown = gr.Image(label="Image", interactive=False, elem_id="pnginfo_preview", height=320,
                                     type="filepath")
                with gr.Column():
                    text = gr.Textbox(label="Parameters", lines=8, interactive=False,
                                      elem_id="pnginfo_generation_info")
                    message = gr.Markdown("", elem_id="pnginfo_message")
                    with gr.Row(elem_classes="gen-send-row"):
                        png_send = {key: gr.Button(label, elem_id=f"pnginfo_send_{key}", size="sm")
                                    for key, label in (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"),
                                                       ("inpaint", "Send to inpaint"), ("extras", "Send to extras"),
                                                       ("controlnet", "Send to ControlNet"))}
            history = build_history_tab(studio)
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                build_train_tab(studio)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings") as settings_tab:
                build_settings_tab(studio, settings_tab)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                build_extensions_tab(studio)
            if studio.cluster is not None:   # --workers / --ray-address
                with gr.Tab("Workers", id="workers", elem_id="tab_workers"):
                    build_workers_tab(studio)

        # the device policy is resolved on first use (it imports torch): the footer gets it on page load
        footer = gr.Markdown(f"Studio {__version__} · API: /sdapi/v1 · docs: /docs", elem_id="studio_footer")
        blocks.load(lambda: f"Studio {__version__} · {studio.policy.label} · API: /sdapi/v1 · docs: /docs", None,
                    footer, queue=False, show_progress="hidden")

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
            return checkpoint_update(studio), status, loaded

        follow_inputs = {c for tab in followers for c in tab.inputs()} | {switched}
        follow_outputs = [c for tab in followers for c in tab.outputs()]

        def after_choice(data):
            # Forge: a newly chosen checkpoint brings its family's presets; a failed choice changes nothing
            return follow_model(studio, followers, data, apply_presets=bool(data[switched]),
                                from_flow=data[switched] == "from_flow")

        def after_page_load(data):
            # a fresh page starts from the SD defaults: bring the loaded model's presets back
            return follow_model(studio, followers, data, apply_presets=True)

        def banner_update() -> Any:
            text = demo_banner_text(studio)
            return gr.update(value=text, visible=bool(text))

        def do_refresh():
            studio.refresh_checkpoints()
            studio.refresh_vaes()
            return checkpoint_update(studio), banner_update(), gr.update(choices=studio.vae_choices()), \
                module_picker_update(studio)

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
            return checkpoint_update(studio), _model_status(studio), gr.Timer(active=loading), banner_update()

        blocks.load(sync, None, [checkpoint, model_status, watcher, banner], queue=False).then(
            after_page_load, follow_inputs, follow_outputs, queue=False, show_progress="hidden")
        # the tick that finds the first model loaded is the last one: its presets apply then
        watcher.tick(sync, None, [checkpoint, model_status, watcher, banner], queue=False,
                     show_progress="hidden").then(after_page_load, follow_inputs, follow_outputs, queue=False,
                                                  show_progress="hidden")
        refresh.click(do_refresh, None, [checkpoint, banner, vae, modules])

        # new files in the model folders (a finished training run, a copied LoRA) appear by themselves:
        # the server's FolderWatcher rescans, this timer redraws what changed
        seen = gr.State(None)
        folders = gr.Timer(2.0)
        galleries = [*controls.extra.galleries.values(), controls.extra.shown]

        def follow_folders(last):
            w = studio.watcher
            now = w.versions() if w is not None else {}
            changed = w.changed_since(last) if w is not None and last is not None else set()
            keep = gr.update()
            lists = controls.extra.fill("") if changed & {"lora", "hypernetworks", "embeddings", "checkpoints"} \
                else [keep] * len(galleries)
            return [checkpoint_update(studio) if "checkpoints" in changed else keep,
                    banner_update() if "checkpoints" in changed else keep,
                    gr.update(choices=studio.vae_choices()) if "vae" in changed else keep,
                    module_picker_update(studio) if changed & {"modules", "vae"} else keep, *lists, now]

        folders.tick(follow_folders, seen, [checkpoint, banner, vae, modules, *galleries, seen], queue=False,
                     show_progress="hidden")
        # a merged checkpoint is in the dropdown at once (A1111 lists it after a merge)
        merger.merged.then(lambda: checkpoint_update(studio), None, checkpoint, queue=False, show_progress="hidden")

        def read_png(path):
            if not path:
                return None, "", ""
            try:
                image = open_image(Path(path).read_bytes())
            except (ImageReadError, OSError) as e:
                return None, "", f"**Error:** {e}"
            info = read_infotext(image)
            return path, info or "", "" if info else "_No generation parameters in this image._"

        upload.change(read_png, upload, [shown, text, message])

        # ---- send-to: every source (galleries, PNG Info) to every receiver
        unit0 = controls.controlnet.units[0].components

        def txt2img_more(fields: dict[str, Any], parsed: dict[str, Any]) -> list[Any]:
            return [*hires_updates(fields), *paste_updates(controls.controlnet, parsed)]

        receivers = {
            "txt2img": Receiver("txt2img", "txt2img", None, params=controls.follows_model.params(),
                                more=[*hires_components(controls.hires), *controls.controlnet.inputs()],
                                more_updates=txt2img_more),
            "img2img": Receiver("img2img", "img2img", img2img.image, params=img2img.params()),
            "inpaint": Receiver("inpaint", "inpaint", inpaint.image, wrap=editor_value, params=inpaint.params()),
            "extras": Receiver("extras", "extras", extras_image),
            # a ControlNet unit: txt2img's first unit takes the picture and is switched on
            "controlnet": Receiver("controlnet", "txt2img", unit0["image"], wrap=editor_value,
                                   more=[unit0["enabled"]], more_updates=lambda fields, parsed: [True]),
        }
        options = lambda: studio.settings.options  # noqa: E731 - read at click time

        for key, button in png_send.items():
            receiver = receivers[key]
            button.click(send_handler(receiver, options), [shown, text], [*receiver.outputs(), tabs],
                         queue=False, show_progress="hidden")

        for out in (controls.follows_model.out, img2img.out, inpaint.out, controlnet_out):
            wire_output_buttons(studio, out, receivers, tabs, options)
        for key, button in history.send.items():
            button.click(send_handler(receivers[key], options), [history.selected_path, history.selected_infotext],
                         [*receivers[key].outputs(), tabs], queue=False, show_progress="hidden")
    return blocks


def wire_output_buttons(studio: Studio, out: Any, receivers: dict[str, Receiver], tabs: Any,
                        options: Any) -> None:
    """A gallery's Save / Zip / Open folder and Send to … buttons."""
    def chosen(gallery: Any, index: Any, texts: list[str] | None) -> tuple[Any, str]:
        image, i = gallery_pick(gallery, index)
        texts = list(texts or [])
        return image, texts[i] if i < len(texts) else (texts[0] if texts else "")

    for key, button in out.send.items():
        handle = send_handler(receivers[key], options)
        button.click(lambda g, i, t, handle=handle: handle(*chosen(g, i, t)), [out.gallery, out.selected,
                     out.infotexts], [*receivers[key].outputs(), tabs], queue=False, show_progress="hidden")

    def save(gallery, index, texts):
        path = save_chosen(studio.paths.data, gallery, index, texts)
        if path is None:
            gr.Warning("Nothing to save yet.")
            return gr.update()
        gr.Info(f"Saved {path.name} to {path.parent}")
        return gr.update(value=str(path), visible=True)

    def zipped(gallery):
        path = zip_gallery(studio.paths.data, gallery)
        if path is None:
            gr.Warning("Nothing to zip yet.")
            return gr.update()
        return gr.update(value=str(path), visible=True)

    kind = "txt2img" if out.tab_id in ("txt2img", "controlnet") else "img2img"
    out.save.click(save, [out.gallery, out.selected, out.infotexts], out.download, show_progress="hidden")
    out.zip.click(zipped, out.gallery, out.download, show_progress="hidden")
    out.open_folder.click(lambda: gr.Info(open_folder(samples_folder(studio.settings.options, studio.paths.data, kind),
                                                      may_open_folders(studio.flags))), None, None, queue=False)


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
    if studio.cluster is not None:   # the front loads nothing: each worker loads what its jobs need
        return "_Loaded by the generation workers as jobs need it (Workers tab)._"
    if current is None:
        busy = studio.queue.current
        return "_Loading model…_" if busy and busy.description == "initial model load" else "_No model loaded._"
    return f"{current.label}" + (" · **demo**" if current.info.is_demo else "")
