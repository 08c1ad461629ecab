"""Starting the studio as a user does: UI + API on one port (or API only with --nowebui).

The server answers before torch, diffusers and transformers are imported: nothing built here needs
them (the device policy is resolved, and the first model loaded, on first use), so the UI is up in
about the time a bare Gradio app of its size takes, and the first generation pays for the imports.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from studio.config import Flags

if TYPE_CHECKING:
    import gradio as gr

    from studio.core import Studio

log = logging.getLogger("studio")


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep:
            raise SystemExit(f"--gradio-auth expects user:password pairs, got {item!r}")
        pairs.append((user, password))
    return pairs


def _start_initial_load(studio, flags: Flags) -> None:
    """The first checkpoint loads once the server listens: loading it (and importing torch for it)
    alongside would slow the start on a small CPU, and the first generation waits behind the load in
    the job queue anyway."""
    if not flags.skip_load_model_at_start:
        studio.start_initial_load()


def _load_when_started(server: Any, studio, flags: Flags) -> None:
    """--nowebui: start the initial load once uvicorn's ``server`` is listening (it runs in the caller's thread)."""
    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            _start_initial_load(studio, flags)

    threading.Thread(target=wait, name="initial-load", daemon=True).start()


def build_studio(flags: Flags) -> Studio:
    """The Studio as serve() runs it: the model folders watched and, with --workers / --ray-address,
    the generation workers' cluster starting. Imports no torch."""
    from studio.core import Studio

    studio = Studio.create(flags)
    studio.watch_model_folders()
    from studio.cluster.plan import wants_cluster

    if wants_cluster(flags):   # Ray is imported only here, and only with the flags
        from studio.cluster.front import Cluster

        cluster = Cluster(flags, studio.engine)
        studio.use_cluster(cluster)
        cluster.start_in_background()
    return studio


def build_blocks(studio: Studio) -> gr.Blocks:
    """The Gradio UI serve() launches (not launched)."""
    from studio.ui.app import build_ui

    return build_ui(studio)


def serve(flags: Flags, block: bool = True):
    studio = build_studio(flags)
    if flags.share or flags.listen:
        if not flags.gradio_auth:
            log.warning("Serving beyond this machine (--listen/--share) without --gradio-auth: anyone who "
                        "can reach the port can use the studio.")
    from studio.api.routes import install_api

    if flags.nowebui:
        import uvicorn
        from fastapi import FastAPI

        app = FastAPI(title="Studio API", version="1")
        install_api(app, studio)
        log.info("API only: http://%s:%d/sdapi/v1 (docs at /docs)", flags.host, flags.port)
        config = uvicorn.Config(app, host=flags.host, port=flags.port, log_level="warning")
        server = uvicorn.Server(config)
        _load_when_started(server, studio, flags)
        if block:
            server.run()
            return studio, app
        threading.Thread(target=server.run, daemon=True).start()
        return studio, app

    from studio.ui.app import CSS

    blocks = build_blocks(studio)
    # no blocks.queue(...): Gradio queues by default with one job per event, and calling it again
    # rebuilds the app and the config of all ~1,100 blocks (~0.4 s of start-up)
    app, local_url, share_url = blocks.launch(
        server_name=flags.host, server_port=flags.port, share=flags.share,
        auth=parse_auth(flags.gradio_auth), prevent_thread_lock=True, inbrowser=flags.inbrowser,
        quiet=True, css=CSS, show_error=True, footer_links=["api"],
        app_kwargs={"docs_url": "/docs"},  # Gradio turns FastAPI's docs off by default
    )
    install_api(app, studio)
    _start_initial_load(studio, flags)
    print(f"Studio running on {local_url}" + (f" and {share_url}" if share_url else ""), flush=True)
    if block:
        blocks.block_thread()
    return studio, app
