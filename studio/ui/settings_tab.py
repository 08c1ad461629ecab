"""Settings tab: the options a user changes most, grouped as A1111 groups them, with one Apply
button. The values go through the same checks as POST /sdapi/v1/options, so a bad value is
refused with a message and nothing is saved.

The Optimizations section holds the opt-in fast modes; each says what it costs (token merging
changes the image; torch.compile spends minutes compiling on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from studio.api.options import API_DEFAULTS, SAMPLES_FORMATS, validate_options
from studio.config import DEFAULT_SETTINGS
from studio.generation.request import RequestError
from studio.optimizations import COMPILE_BACKENDS, MAX_TOKEN_MERGING

if TYPE_CHECKING:
    from studio.core import Studio


@dataclass(frozen=True)
class Option:
    key: str
    label: str
    kind: str                      # "check" | "slider" | "number" | "choice"
    lo: float = 0
    hi: float = 1
    step: float = 1
    choices: tuple[str, ...] = ()
    info: str | None = None


@dataclass(frozen=True)
class Section:
    title: str
    options: tuple[Option, ...]
    note: str = ""


SECTIONS = (
    Section("Saving images", (
        Option("samples_format", "File format for images", "choice",
               choices=tuple(f for f in SAMPLES_FORMATS if f != "jpeg")),
        Option("jpeg_quality", "Quality for saved JPEG and WebP images", "slider", 1, 100, 1),
        Option("webp_lossless", "Lossless WebP", "check"),
        Option("enable_pnginfo", "Save the generation parameters inside the image", "check"),
        Option("save_txt", "Also write the parameters to a .txt file next to each image", "check"),
    )),
    Section("Stable Diffusion", (
        Option("sd_checkpoints_limit", "Checkpoints to keep loaded", "slider", 1, 10, 1),
        Option("sd_checkpoint_cache_mb", "RAM for cached checkpoints, MB (0 = half of the RAM)", "number", 0, 1 << 20),
        Option("CLIP_stop_at_last_layers", "Clip skip", "slider", 1, 12, 1),
        Option("eta_ddim", "Eta for DDIM", "slider", 0, 1, 0.01),
        Option("eta_ancestral", "Eta for ancestral samplers", "slider", 0, 1, 0.01),
    )),
    Section("Live previews", (
        Option("live_previews_enable", "Show live previews while generating", "check"),
        Option("show_progress_every_n_steps", "Preview every N steps (-1: only at the end of a batch)",
               "slider", -1, 32, 1),
    )),
    Section("ControlNet", (
        Option("control_net_unit_count", "Number of units (after a reload of the page)", "slider", 1, 10, 1),
        Option("control_net_no_detectmap", "Do not return detected maps", "check"),
    )),
    Section("Optimizations", (
        Option("token_merging_ratio", "Token merging ratio (lossy)", "slider", 0, MAX_TOKEN_MERGING, 0.1,
               info="ToMe: merges similar image tokens; faster at large sizes, changes the image. 0 = off."),
        Option("token_merging_ratio_img2img", "Token merging ratio for img2img (0 = as above)", "slider",
               0, MAX_TOKEN_MERGING, 0.1),
        Option("token_merging_ratio_hr", "Token merging ratio for the hires pass (0 = as above)", "slider",
               0, MAX_TOKEN_MERGING, 0.1),
        Option("sd_compile_unet", "torch.compile the UNet (opt-in; slow first run)", "check",
               info="Compiles the UNet's repeated transformer block. The first generation at each size "
                    "compiles (minutes on a CPU); the compiled code is cached on disk for later runs."),
        Option("sd_compile_backend", "Compile backend", "choice", choices=COMPILE_BACKENDS),
    ), note="Fast modes that trade something for speed. The device policy (dtype, attention, memory "
            "layout) is chosen at start-up and shown in the footer."),
)


# What the studio uses when config.json does not have the key: the tab must show that, or Apply
# would save a value the user never chose (a missing unit count read as 1 instead of 3).
DEFAULTS: dict[str, Any] = {**DEFAULT_SETTINGS, **API_DEFAULTS}


def current(studio: Studio, option: Option) -> Any:
    default = DEFAULTS.get(option.key)
    value = studio.settings.get(option.key, default)
    if option.kind == "choice" and value not in option.choices:
        # "jpeg" and hand-edited values: show what the studio will actually use
        value = "jpg" if value == "jpeg" else default
    return value


def apply_settings(studio: Studio, values: dict[str, Any]) -> str:
    """Save the options that changed; a Markdown message for the result line. Never raises."""
    changed = {k: v for k, v in values.items() if v != studio.settings.get(k, DEFAULTS.get(k))}
    if not changed:
        return "Nothing changed."
    try:
        studio.apply_options(validate_options(changed))
    except RequestError as e:
        return f"❌ Not saved: {e}"
    return "Saved: " + ", ".join(sorted(changed)) + "."


def _component(studio: Studio, option: Option) -> Any:
    value = current(studio, option)
    common = {"label": option.label, "value": value, "elem_id": f"setting_{option.key}", "info": option.info}
    if option.kind == "check":
        return gr.Checkbox(**common)
    if option.kind == "slider":
        return gr.Slider(minimum=option.lo, maximum=option.hi, step=option.step, **common)
    if option.kind == "number":
        return gr.Number(minimum=option.lo, maximum=option.hi, precision=0, **common)
    return gr.Dropdown(choices=list(option.choices), **common)


def build_settings_tab(studio: Studio, tab: Any = None) -> None:
    """Fill the open ``gr.Tab``; when ``tab`` is given, its values are re-read each time it is
    selected, so a change made through the API since the page loaded is shown, not overwritten."""
    options: list[Option] = []
    components: list[Any] = []
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit", scale=0, min_width=160)
        result = gr.Markdown("", elem_id="settings_result")
    for section in SECTIONS:
        with gr.Accordion(section.title, open=True, elem_id=f"settings_{section.title.lower().replace(' ', '_')}"):
            if section.note:
                gr.Markdown(section.note)
            if section.title == "Optimizations":
                gr.Markdown(f"Device policy: `{studio.policy.label}`", elem_id="settings_policy")
            for option in section.options:
                options.append(option)
                components.append(_component(studio, option))

    def on_apply(*values: Any) -> str:
        return apply_settings(studio, {o.key: v for o, v in zip(options, values)})

    apply.click(on_apply, inputs=components, outputs=result)
    if tab is not None:
        tab.select(lambda: [current(studio, o) for o in options], outputs=components)
