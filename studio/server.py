"""Starting the studio as a user does: UI + API on one port (or API only with --nowebui)."""

from __future__ import annotations

import logging
import threading

from studio.config import Flags

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
    """The first checkpoint loads after the UI is built: loading it alongside would slow the UI's
    start on a small CPU, and the first generation waits behind the load in the job queue anyway."""
    if not flags.skip_load_model_at_start:
        studio.start_initial_load()


def serve(flags: Flags, block: bool = True):
    from studio.core import Studio

    studio = Studio.create(flags)
    studio.watch_model_folders()
    from studio.cluster.plan import wants_cluster

    if wants_cluster(flags):   # Ray is imported only here, and only with the flags
        from studio.cluster.front import Cluster

        cluster = Cluster(flags, studio.engine)
        studio.use_cluster(cluster)
        cluster.start_in_background()
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
        _start_initial_load(studio, flags)
        if block:
            server.run()
            return studio, app
        threading.Thread(target=server.run, daemon=True).start()
        return studio, app

    from studio.ui.app import CSS, build_ui

    blocks = build_ui(studio)
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
