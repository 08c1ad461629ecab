"""The Script dropdown of the txt2img / img2img tabs (A1111's): choosing a script shows its controls,
drawn from the same argument declarations the API's ``/script-info`` lists, and Generate sends
``script_name`` + ``script_args`` in A1111's positional order, the way an API client does."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gradio as gr

from studio.core import Studio
from studio.scripts.base import Script, ScriptArg
from studio.ui.bindings import RequestForm

NONE = "None"


@dataclass
class ScriptPanel:
    dropdown: gr.Dropdown
    scripts: list[Script]
    groups: list[Any]
    controls: list[list[Any]]

    def inputs(self) -> list[Any]:
        return [self.dropdown, *(c for group in self.controls for c in group)]

    def bind(self, form: RequestForm) -> None:
        form.bind_group(("script_name", "script_args"), self.inputs(), self.fields)

    def fields(self, values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
        """``script_name`` + ``script_args`` from the dropdown and every script's control values."""
        title, rest = values[0], list(values[1:])
        start = 0
        for script, group in zip(self.scripts, self.controls):
            if script.title == title:
                return {"script_name": script.title, "script_args": rest[start:start + len(group)]}
            start += len(group)
        return {"script_name": None, "script_args": []}


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def control_for_arg(arg: ScriptArg, elem_id: str) -> Any:
    """The Gradio control for one script argument."""
    if arg.kind == "html":
        # an information line (A1111 passes its text as the argument): shown, and sent back unchanged
        return gr.Textbox(value="" if arg.value is None else str(arg.value), label=arg.label or "Info",
                          interactive=False, elem_id=elem_id, show_label=bool(arg.label))
    if arg.kind == "checkboxgroup":
        return gr.CheckboxGroup(list(arg.choices or ()), value=list(arg.value or ()), label=arg.label,
                                elem_id=elem_id)
    if arg.kind == "checkbox":
        return gr.Checkbox(bool(arg.value), label=arg.label, elem_id=elem_id)
    if arg.kind == "slider":
        return gr.Slider(arg.minimum, arg.maximum, value=arg.value, step=arg.step, label=arg.label, elem_id=elem_id)
    if arg.kind == "number":
        return gr.Number(arg.value, label=arg.label, elem_id=elem_id, minimum=arg.minimum, maximum=arg.maximum)
    if arg.kind == "radio":
        return gr.Radio(list(arg.choices or ()), value=arg.value, label=arg.label, elem_id=elem_id)
    if arg.kind == "dropdown" or arg.choices is not None:
        multi = isinstance(arg.value, list)
        return gr.Dropdown(list(arg.choices or ()), value=arg.value, label=arg.label, elem_id=elem_id,
                           multiselect=multi, allow_custom_value=not multi)
    return gr.Textbox(value="" if arg.value is None else str(arg.value), label=arg.label, elem_id=elem_id,
                      lines=4 if arg.kind == "textarea" else 1)


def build_script_panel(studio: Studio, tab: str, elem_prefix: str | None = None) -> ScriptPanel:
    """``tab``: the scripts' tab (txt2img / img2img); ``elem_prefix``: the UI tab's id (inpaint is img2img)."""
    scripts = studio.engine.scripts.for_tab(tab)
    prefix = elem_prefix or tab
    env = studio.engine.script_env()
    dropdown = gr.Dropdown([NONE, *(s.title for s in scripts)], value=NONE, label="Script",
                           elem_id=f"{prefix}_script")
    groups, controls = [], []
    for script in scripts:
        slug = _slug(script.title)
        with gr.Column(visible=False, elem_id=f"{prefix}_script_{slug}") as group:
            controls.append([control_for_arg(arg, f"{prefix}_script_{slug}_{i}")
                             for i, arg in enumerate(script.args(env, tab))])
        groups.append(group)
    dropdown.change(lambda title: [gr.update(visible=title == s.title) for s in scripts], dropdown, groups,
                    queue=False)
    for script, group in zip(scripts, controls):
        _link(script.linked(env, tab), group)
    return ScriptPanel(dropdown, scripts, groups, controls)


def _link(links: dict[int, Any], group: list[Any]) -> None:
    """Wire a script's linked controls: a change of one updates the others it names."""
    for index, changes_for in links.items():
        targets = sorted({t for t in changes_for(group[index].value)} if group else [])
        outputs = [group[t] for t in targets]

        def on_change(value: Any, changes_for: Any = changes_for, targets: list[int] = targets) -> list[Any]:
            changes = changes_for(value)
            return [gr.update(**changes.get(t, {})) for t in targets]

        group[index].change(on_change, group[index], outputs, queue=False)
        # the first state too: the page opens with the default axis's controls shown
        for target, update in changes_for(group[index].value).items():
            for key in ("visible",):
                if key in update:
                    group[target].visible = update[key]
