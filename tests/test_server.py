"""Starting the server in-process: the order of start-up work, which a user sees as how soon the
page answers."""

from __future__ import annotations

import time

import gradio as gr
import requests

from studio.config import parse_flags
from studio.core import Studio
from studio.server import serve
from tests.helpers import free_port, make_models_dir


def test_the_ui_answers_before_the_first_checkpoint_starts_loading(tmp_path, monkeypatch):
    # loading a checkpoint while the UI is being built would slow the UI's start on a small CPU
    make_models_dir(tmp_path)
    port = free_port()
    answers: list[int] = []
    original = Studio.start_initial_load

    def record_then_load(self):
        answers.append(requests.get(f"http://127.0.0.1:{port}/", timeout=30).status_code)
        return original(self)

    monkeypatch.setattr(Studio, "start_initial_load", record_then_load)
    try:
        studio, _ = serve(parse_flags(["--data-dir", str(tmp_path), "--port", str(port)]), block=False)
        assert answers == [200]
        deadline = time.monotonic() + 120
        while studio.models.current is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert studio.models.current is not None and studio.models.current.info.name == "tiny-sd1.safetensors"
    finally:
        gr.close_all()
