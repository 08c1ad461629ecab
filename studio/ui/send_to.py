"""A1111's "Send to …" buttons: a picture and its parameters go from a gallery, PNG Info or History
to txt2img, img2img, Inpaint, Extras or a ControlNet unit.

A :class:`Receiver` is one destination: the component that takes the picture (none for txt2img),
the parameter controls it fills from the infotext (in :data:`PARAM_FIELDS` order), and any more
(txt2img's Hires. fix, its ControlNet units). Seed and size travel only when A1111's ``send_seed``
/ ``send_size`` options say so. Sources hand over (image, infotext); the wiring lives in
``ui/app.py``, where every tab is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio.generation.infotext import infotext_to_fields, parse_infotext
from studio.generation.outputs import ImageReadError, open_image
from studio.generation.samplers import SAMPLER_NAMES, SCHEDULE_LABELS

# The request fields every generation tab shows, in the order Receiver.params lists their controls.
PARAM_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width",
                "height", "clip_skip", "distilled_cfg_scale")


def fields_to_send(fields: dict[str, Any], options: Any) -> dict[str, Any]:
    """A1111's ``send_seed`` / ``send_size``: sending parameters to a tab carries the seed and the size
    only when those options are on (otherwise the tab keeps its own)."""
    drop = set()
    if not options.send_seed:
        drop |= {"seed", "subseed", "subseed_strength"}
    if not options.send_size:
        drop |= {"width", "height"}
    return {k: v for k, v in fields.items() if k not in drop}


def value_update(name: str, value: Any) -> Any:
    """One control's update from a field value; a value the control cannot show leaves it as it is."""
    if value is None:
        return gr.update()
    if name in ("sampler_name", "hr_sampler_name") and value not in SAMPLER_NAMES:
        return gr.update()
    if name in ("scheduler", "hr_scheduler") and value not in SCHEDULE_LABELS:
        return gr.update()
    return gr.update(value=value)


def param_updates(fields: dict[str, Any]) -> list[Any]:
    return [value_update(name, fields.get(name)) for name in PARAM_FIELDS]


@dataclass
class Receiver:
    key: str                                   # "txt2img", "img2img", "inpaint", "extras", "controlnet"
    tab: str                                   # the gr.Tabs id to open
    image: Any = None                          # the component that takes the picture
    wrap: Callable[[Image.Image], Any] = lambda image: image
    params: list[Any] = field(default_factory=list)     # PARAM_FIELDS' controls (empty: none)
    more: list[Any] = field(default_factory=list)       # further controls, filled by more_updates
    more_updates: Callable[[dict[str, Any], dict[str, Any]], list[Any]] | None = None

    def outputs(self) -> list[Any]:
        return [*([self.image] if self.image is not None else []), *self.params, *self.more]

    def updates(self, image: Image.Image | None, infotext: str, options: Any) -> list[Any]:
        parsed = parse_infotext(infotext) if infotext else {}
        fields = fields_to_send(infotext_to_fields(parsed), options)
        out: list[Any] = []
        if self.image is not None:
            out.append(self.wrap(image) if image is not None else gr.update())
        if self.params:
            out += param_updates(fields)
        if self.more:
            out += self.more_updates(fields, parsed) if self.more_updates else [gr.update() for _ in self.more]
        return out


def editor_value(image: Image.Image) -> dict[str, Any]:
    """A picture as a gr.ImageEditor value (nothing painted yet)."""
    return {"background": image, "layers": [], "composite": image}


def gallery_pick(value: Any, index: Any) -> tuple[Image.Image | None, int]:
    """The picture at ``index`` of a gallery's value (``[(path or image, caption), …]`` or Gradio's
    dicts), and the index used (the first one when the index is out of range)."""
    items = list(value or [])
    if not items:
        return None, 0
    i = index if isinstance(index, int) and 0 <= index < len(items) else 0
    item = items[i]
    if isinstance(item, dict):
        item = item.get("image") or item.get("path") or item.get("name")
        if isinstance(item, dict):
            item = item.get("path") or item.get("url")
    elif isinstance(item, (list, tuple)):
        item = item[0]
    return load_picture(item), i


def load_picture(item: Any) -> Image.Image | None:
    if item is None:
        return None
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    try:
        return open_image(Path(str(item)).read_bytes()).convert("RGB")
    except (OSError, ImageReadError):
        return None


def send_handler(receiver: Receiver, options: Callable[[], Any]) -> Callable[..., list[Any]]:
    """A click handler taking (image, infotext) and returning the receiver's updates plus the tab switch."""
    def handle(image: Any, infotext: str | None) -> list[Any]:
        picture = load_picture(image)
        if picture is None and receiver.image is not None:
            gr.Warning("No image to send: generate or choose one first.")
            return [*(gr.update() for _ in receiver.outputs()), gr.update()]
        return [*receiver.updates(picture, infotext or "", options()), gr.Tabs(selected=receiver.tab)]
    return handle
