"""Extensions tab (A1111's, adapted): the installed extensions with their status and errors, an
enabled-list with Apply (takes effect at once, no restart), and install from a git URL.

The caller opens ``gr.Tab("Extensions")``; :func:`build_extensions_tab` fills it. The handlers are
module-level functions of ``studio`` so they can be tested without a browser; they never raise to
Gradio and report problems in their result Markdown instead.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.context import Context

from studio.extensions import ACCESS_DISABLED, TIMED_OUT, ExtensionError, ExtensionInfo, ExtensionManager

if TYPE_CHECKING:
    from studio.core import Studio

HEADERS = ["Extension", "Status", "Preprocessors", "Path", "Error"]
FAILED = ("error", TIMED_OUT)  # statuses shown as failures: the row in red, a warning after Apply
RELOAD_NOTE = ("Apply takes effect at once, without a restart. The ControlNet preprocessor lists in the "
               "other tabs show the change after the page is reloaded.")
INSTALL_NOTE = ("Clones a git repository into the data folder's `extensions/` and loads it. An extension "
                "for this studio has an `extension.py` defining `register(api)`; A1111 extensions (a "
                "`scripts/` folder) do not work here.")


def table_rows(manager: ExtensionManager) -> list[list[str]]:
    return [[e.name, e.status, ", ".join(e.preprocessors), str(e.path), e.error or ""] for e in manager.extensions]


def row_class(status: str) -> str:
    """CSS classes of a row: ``ext-<status>`` (spaces as dashes), plus ``ext-error`` for every failure
    so a timed-out extension is styled like a broken one."""
    own = "ext-" + status.replace(" ", "-")
    return f"{own} ext-error" if status in FAILED and own != "ext-error" else own


def table_value(manager: ExtensionManager) -> str:
    """An HTML table rather than a Dataframe: a broken extension's error wraps onto as many lines as
    it needs instead of being cut off at the cell's edge."""
    head = "".join(f"<th>{h}</th>" for h in HEADERS)
    body = "".join(
        f"<tr class='{html.escape(row_class(row[1]))}'>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
        + "</tr>"
        for row in table_rows(manager))
    if not body:
        body = f"<tr><td colspan='{len(HEADERS)}'>No extensions installed.</td></tr>"
    return f"<table class='extensions-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def enabled_update(manager: ExtensionManager) -> dict[str, Any]:
    return gr.update(choices=[e.name for e in manager.extensions],
                     value=[e.name for e in manager.extensions if e.enabled])


def refresh_extensions(studio: Studio) -> tuple[str, dict[str, Any]]:
    return table_value(studio.extensions), enabled_update(studio.extensions)


def _failures(infos: list[ExtensionInfo]) -> str:
    return "".join(f"\n- ⚠️ **{e.name}** ({e.status}): {e.error}" for e in infos if e.status in FAILED)


def apply_extensions(studio: Studio, enabled: list[str] | None) -> tuple[str, str, dict[str, Any]]:
    """Apply button: exactly ``enabled`` are on afterwards. Returns (message, table, enabled list)."""
    manager = studio.extensions
    try:
        infos = manager.apply(enabled or [])
    except ExtensionError as e:
        return f"**Error:** {e}", *refresh_extensions(studio)
    on = [e.name for e in infos if e.enabled]
    off = [e.name for e in infos if not e.enabled]
    text = (f"**Applied.** Enabled: {', '.join(on) or 'none'}. Disabled: {', '.join(off) or 'none'}."
            f"{_failures(infos)}\n\n{RELOAD_NOTE}")
    return text, *refresh_extensions(studio)


def install_extension(studio: Studio, url: str | None, dirname: str | None = None,
                      branch: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """Install button. Returns (message, table, enabled list)."""
    try:
        info = studio.extensions.install_from_url(url or "", studio.flags.extension_install_allowed,
                                                  dirname=dirname or None, branch=branch or None)
    except ExtensionError as e:
        return f"**Error:** {e}", *refresh_extensions(studio)
    if info.status in FAILED:
        text = f"Installed **{info.name}** into `{info.path}`, but it failed to load ({info.status}): {info.error}"
    else:
        added = ", ".join(info.preprocessors) or "nothing"
        text = (f"Installed **{info.name}** into `{info.path}` and loaded it (preprocessors: {added}). "
                "Reload the page to see them in the ControlNet lists.")
    return text, *refresh_extensions(studio)


def build_extensions_tab(studio: Studio) -> None:
    manager = studio.extensions
    allowed = bool(studio.flags.extension_install_allowed)
    with gr.Tabs(elem_id="extensions_tabs"):
        with gr.Tab("Installed", elem_id="extensions_installed_tab"):
            gr.Markdown(RELOAD_NOTE, elem_id="extensions_note")
            table = gr.HTML(table_value(manager), elem_id="extensions_table")
            enabled = gr.CheckboxGroup(choices=[e.name for e in manager.extensions],
                                       value=[e.name for e in manager.extensions if e.enabled],
                                       label="Enabled extensions", elem_id="extensions_enabled")
            with gr.Row():
                apply = gr.Button("Apply", variant="primary", elem_id="extensions_apply")
                refresh = gr.Button("Refresh", elem_id="extensions_refresh")
            result = gr.Markdown("", elem_id="extensions_result")
        with gr.Tab("Install from URL", elem_id="extensions_install_tab"):
            if not allowed:
                gr.Markdown(f"**Installing is off:** {ACCESS_DISABLED}.", elem_id="extension_install_notice")
            gr.Markdown(INSTALL_NOTE)
            url = gr.Textbox(label="URL for extension's git repository", placeholder="https://github.com/…",
                             interactive=allowed, elem_id="extension_install_url")
            with gr.Row():
                dirname = gr.Textbox(label="Local directory name", placeholder="Leave empty for auto",
                                     interactive=allowed, elem_id="extension_install_dirname")
                branch = gr.Textbox(label="Specific branch name", placeholder="Leave empty for default main branch",
                                    interactive=allowed, elem_id="extension_install_branch")
            install = gr.Button("Install", variant="primary", interactive=allowed,
                                elem_id="extension_install_button")
            install_result = gr.Markdown("", elem_id="extension_install_result")

    apply.click(lambda names: apply_extensions(studio, names), enabled, [result, table, enabled])
    refresh.click(lambda: refresh_extensions(studio), None, [table, enabled], queue=False)
    install.click(lambda u, d, b: install_extension(studio, u, d, b), [url, dirname, branch],
                  [install_result, table, enabled])
    # the API can change extensions too; a page (re)load shows the current state
    if Context.root_block is not None:
        Context.root_block.load(lambda: refresh_extensions(studio), None, [table, enabled], queue=False)
