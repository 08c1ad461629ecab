"""The extra-networks browser: a tab of cards per kind (checkpoints, LoRA, textual inversion,
hypernetworks) with a search box and refresh. Clicking a card adds its tag to the prompt (a
second click removes it), or, for a checkpoint, loads it, as in A1111."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from studio.core import Studio
from studio.networks.cards import KIND_LABELS, KINDS, Card, card_image, insert_into_prompt


@dataclass
class ExtraNetworksBrowser:
    galleries: dict[str, gr.Gallery]
    search: gr.Textbox
    refresh: gr.Button
    shown: gr.State          # kind -> names of the cards currently displayed, in order
    fill: Callable[..., list]  # (query, rescan=False) -> gallery values + shown, for page load


def _gallery_value(cards: list[Card]) -> list[tuple]:
    return [(card_image(c), c.caption) for c in cards]


def build_extra_networks(studio: Studio, prompt: gr.Textbox, tab_id: str) -> ExtraNetworksBrowser:
    galleries: dict[str, gr.Gallery] = {}
    with gr.Accordion("Extra networks", open=False, elem_id=f"{tab_id}_extra_networks"):
        with gr.Row(equal_height=True):
            search = gr.Textbox(placeholder="Search…", show_label=False, elem_id=f"{tab_id}_extra_search",
                                scale=6)
            refresh = gr.Button("↻ Refresh", elem_id=f"{tab_id}_extra_refresh", scale=0, min_width=100,
                                size="sm")
        with gr.Tabs():
            for kind in KINDS:
                with gr.Tab(KIND_LABELS[kind], elem_id=f"{tab_id}_extra_tab_{kind}"):
                    galleries[kind] = gr.Gallery(
                        value=None, label=KIND_LABELS[kind], show_label=False, columns=6, height=250,
                        allow_preview=False, object_fit="cover", elem_id=f"{tab_id}_extra_{kind}",
                        elem_classes="extra-network-cards",
                    )
    shown = gr.State({})
    kinds = list(KINDS)

    def fill(query: str, rescan: bool = False):
        if rescan:
            studio.refresh_networks()
        names: dict[str, list[str]] = {}
        values = []
        for kind in kinds:
            cards = [c for c in studio.network_cards(kind) if c.matches(query or "")]
            names[kind] = [c.name for c in cards]
            values.append(_gallery_value(cards))
        return [*values, names]

    outputs = [*(galleries[k] for k in kinds), shown]
    search.submit(fill, search, outputs, queue=False)
    refresh.click(lambda q: fill(q, rescan=True), search, outputs)

    def clicked_for(kind: str):
        def clicked(text: str, names: dict[str, list[str]], evt: gr.SelectData):
            listed = names.get(kind, [])
            if evt.index is None or evt.index >= len(listed):
                return gr.update()
            card = next((c for c in studio.network_cards(kind) if c.name == listed[evt.index]), None)
            if card is None:
                return gr.update()
            return insert_into_prompt(text, card.insert)
        return clicked

    for kind in kinds:
        if kind != "checkpoints":
            galleries[kind].select(clicked_for(kind), [prompt, shown], prompt, queue=False)
    return ExtraNetworksBrowser(galleries, search, refresh, shown, fill)


def checkpoint_card_title(studio: Studio, names: dict[str, list[str]], index: int | None) -> str | None:
    listed = names.get("checkpoints", [])
    if index is None or index >= len(listed):
        return None
    card = next((c for c in studio.network_cards("checkpoints") if c.name == listed[index]), None)
    return card.insert if card else None
