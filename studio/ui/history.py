"""The History tab: the output folders' images (this run's and earlier ones), newest first, a page
of thumbnails at a time, searchable by prompt words, ``model:`` and ``date:``; the chosen image
large with its infotext, A1111's send-to buttons (wired in ``ui/app.py``, where every tab is known),
Open folder, and Delete behind a confirmation step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from studio.errors import RequestError
from studio.generation.history import DEFAULT_PAGE_SIZE, HistoryPage, OutputHistory
from studio.generation.outputs import ImageReadError, open_image
from studio.ui.output_actions import may_open_folders, open_folder

# A1111's send-to buttons: (key, label); the keys are those of ui/send_to.py's receivers
SEND_TARGETS = (("txt2img", "Send to txt2img"), ("img2img", "Send to img2img"), ("inpaint", "Send to inpaint"),
                ("extras", "Send to extras"), ("controlnet", "Send to ControlNet"))
CAPTION_CHARS = 60
# on a phone the chosen image is below the gallery: bring it into view
SCROLL_TO_CHOSEN = ("() => { if (window.innerWidth < 640) "
                    "document.querySelector('#history_image')?.scrollIntoView({behavior: 'smooth'}); }")
LAST = 10**9  # a step past any page: the page index is clamped to the last one
SEARCH_HINT = "Search: words of the prompt · model:<name or hash> · date:2026-12-02 · negative:<word>"
# Thumbnails as many as fit a row (Gradio's fixed column count stretches a page of one image to the
# whole width), square cells, and a shorter gallery on a phone; ui/app.py adds this to its CSS.
HISTORY_CSS = """
#history_gallery .grid-container {grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important;}
#history_gallery .thumbnail-item {aspect-ratio: 1 / 1 !important; height: auto !important;}
#history_page {align-self: center;}
@media (max-width: 640px) {
  #history_gallery .grid-container {grid-template-columns: repeat(auto-fill, minmax(100px, 1fr)) !important;}
  #history_gallery {height: 380px !important;}
}
"""


@dataclass
class HistoryTab:
    """What ``ui/app.py`` wires: each ``send`` button's click takes ``[selected_path, selected_infotext]``
    (the file's path and its infotext, as ``send_to.send_handler`` expects); ``tab.select`` already
    refreshes the page, ``refresh`` can be triggered after a generation."""

    tab: gr.Tab
    search: gr.Textbox
    gallery: gr.Gallery
    image: gr.Image
    info: gr.Textbox
    message: gr.Markdown
    page_label: gr.Markdown
    selected_path: gr.State      # str: the chosen image's absolute path ("" when none)
    selected_infotext: gr.State  # str: its infotext
    send: dict[str, gr.Button]
    delete: gr.Button
    confirm_delete: gr.Button
    cancel_delete: gr.Button
    open_folder: gr.Button
    refresh: gr.Button
    history: OutputHistory


def caption(prompt: str, name: str) -> str:
    text = " ".join(prompt.split()) or name
    return text if len(text) <= CAPTION_CHARS else text[:CAPTION_CHARS - 1] + "…"


def page_text(found: HistoryPage) -> str:
    noun = "image" if found.total == 1 else "images"
    return f"Page {found.index + 1} of {found.pages} · {found.total} {noun}"


def build_history_tab(studio: Any, history: OutputHistory | None = None,
                      page_size: int = DEFAULT_PAGE_SIZE) -> HistoryTab:
    """The tab, opened here: call inside the app's ``gr.Tabs``."""
    history = history or OutputHistory(studio.paths.data, lambda: studio.settings.options)
    flags = getattr(studio, "flags", None)
    may_open = may_open_folders(flags)

    with gr.Tab("History", id="history", elem_id="tab_history") as tab:
        with gr.Row(equal_height=True):
            search = gr.Textbox(show_label=False, placeholder=SEARCH_HINT, elem_id="history_search", scale=6,
                                max_lines=1, container=False, min_width=120)
            search_button = gr.Button("Search", elem_id="history_search_button", scale=0, min_width=70, size="md")
            refresh = gr.Button("↻ Refresh", elem_id="history_refresh", scale=0, min_width=90, size="md")
        with gr.Row(equal_height=True, elem_id="history_pager"):
            first = gr.Button("« First", elem_id="history_first", size="sm", scale=0, min_width=70)
            prev = gr.Button("‹ Prev", elem_id="history_prev", size="sm", scale=0, min_width=70)
            following = gr.Button("Next ›", elem_id="history_next", size="sm", scale=0, min_width=70)
            last = gr.Button("Last »", elem_id="history_last", size="sm", scale=0, min_width=70)
            page_label = gr.Markdown("", elem_id="history_page", min_width=220)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                gallery = gr.Gallery(label="Images, newest first", elem_id="history_gallery", columns=6,
                                     height=560, object_fit="contain", format="jpeg", allow_preview=False,
                                     show_label=False)
            with gr.Column(scale=2, min_width=300):
                image = gr.Image(label="Selected image", interactive=False, elem_id="history_image", height=360,
                                 type="pil")
                info = gr.Textbox(label="Generation parameters", lines=6, interactive=False, elem_id="history_info")
                message = gr.Markdown("", elem_id="history_message")
                with gr.Row():
                    send = {key: gr.Button(label, elem_id=f"history_send_{key}", size="sm", min_width=90)
                            for key, label in SEND_TARGETS}
                with gr.Row():
                    delete = gr.Button("Delete", elem_id="history_delete", size="sm", variant="stop", min_width=90)
                    confirm = gr.Button("Confirm delete", elem_id="history_confirm_delete", size="sm",
                                        variant="stop", visible=False, min_width=110)
                    cancel = gr.Button("Cancel", elem_id="history_cancel_delete", size="sm", visible=False,
                                       min_width=80)
                    folder = gr.Button("Open folder", elem_id="history_open_folder", size="sm", min_width=110)
    index = gr.State(0)
    paths = gr.State([])  # the shown page's paths, in the gallery's order
    selected_path = gr.State("")
    selected_infotext = gr.State("")

    def show(query: str, wanted: int) -> list[Any]:
        found = history.page(wanted, page_size, query)
        thumbs, listed = [], []
        for item in found.items:
            try:
                with Image.open(history.thumbnail(item.path)) as thumb:
                    thumb.load()
            except (RequestError, ImageReadError, OSError):
                continue  # deleted or unreadable since it was listed: left off this page
            thumbs.append((thumb, caption(item.prompt, item.path.name)))
            listed.append(str(item.path))
        note = "" if found.total or not query else f"Nothing matches “{query}”."
        return [thumbs, page_text(found), found.index, listed, note]

    shown = [gallery, page_label, index, paths, message]

    def move(step: int | None):
        def handle(query: str, current: int) -> list[Any]:
            return show(query, 0 if step is None else current + step)
        return handle

    def choose_image(page_paths: list[str], evt: gr.SelectData) -> list[Any]:
        i = evt.index if isinstance(evt.index, int) else 0
        if not 0 <= i < len(page_paths):
            return [gr.update(), gr.update(), "", "", "", gr.update(visible=False), gr.update(visible=False)]
        try:
            item = history.entry(page_paths[i])
            picture = open_image(item.path.read_bytes())
        except (RequestError, ImageReadError, OSError) as e:
            return [None, "", "", "", f"⚠️ {e}", gr.update(visible=False), gr.update(visible=False)]
        return [picture, item.infotext, str(item.path), item.infotext, f"`{item.rel}` · {item.width}×{item.height}",
                gr.update(visible=False), gr.update(visible=False)]

    def ask(path: str) -> list[Any]:
        if not path:
            return ["Choose an image first.", gr.update(visible=False), gr.update(visible=False)]
        return [f"Delete `{history.relative(Path(path))}`? This cannot be undone.", gr.update(visible=True),
                gr.update(visible=True)]

    def remove(path: str, query: str, current: int) -> list[Any]:
        hidden = [gr.update(visible=False), gr.update(visible=False)]
        try:
            removed = history.delete(path)
        except RequestError as e:
            return [*show(query, current)[:4], f"⚠️ {e}", gr.update(), gr.update(), gr.update(), gr.update(), *hidden]
        names = ", ".join(f"`{p.name}`" for p in removed)
        return [*show(query, current)[:4], f"Deleted {names}.", None, "", "", "", *hidden]

    def cancel_ask() -> list[Any]:
        return ["", gr.update(visible=False), gr.update(visible=False)]

    def open_it(path: str) -> str:
        target = Path(path).parent if path else history.roots()[0]
        if not target.is_dir():
            return f"`{target}` does not exist yet: generate an image first."
        try:
            return open_folder(target, may_open)
        except OSError as e:
            return f"⚠️ Could not open `{target}`: {e}"

    listing = [search, index]
    search.submit(move(None), listing, shown)
    search_button.click(move(None), listing, shown)
    first.click(move(None), listing, shown)
    prev.click(move(-1), listing, shown)
    following.click(move(1), listing, shown)
    last.click(move(LAST), listing, shown)
    refresh.click(move(0), listing, shown)
    tab.select(move(0), listing, shown)
    gallery.select(choose_image, paths, [image, info, selected_path, selected_infotext, message, confirm, cancel]).then(
        None, js=SCROLL_TO_CHOSEN)
    delete.click(ask, selected_path, [message, confirm, cancel])
    cancel.click(cancel_ask, None, [message, confirm, cancel])
    confirm.click(remove, [selected_path, search, index],
                  [*shown[:4], message, image, info, selected_path, selected_infotext, confirm, cancel])
    folder.click(open_it, selected_path, message)
    return HistoryTab(tab, search, gallery, image, info, message, page_label, selected_path, selected_infotext, send,
                      delete, confirm, cancel, folder, refresh, history)
