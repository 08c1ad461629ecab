"""Shared fixtures' building blocks: a data dir with tiny checkpoints, a studio server."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from studio.testing import make_checkpoint

REPO = Path(__file__).resolve().parent.parent
# The browser tests' Chromium (Debian's, installed by .ci/run) and its flags: headless, no network calls of its own
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@functools.cache
def _tiny_checkpoint(family: str, suffix: str) -> Path:
    """The tiny checkpoint of a family and file format, written once per test run: building one takes
    0.3-0.6 s and dozens of fixtures want the same file (same seed, so the same bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="studio-test-checkpoints-"))
    atexit.register(shutil.rmtree, folder, True)
    return make_checkpoint(folder / f"tiny-{family}{suffix}", family, seed=1)


def make_models_dir(root: Path, families=(("sd1", ".safetensors"),)) -> Path:
    folder = root / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    for family, suffix in families:
        path = folder / f"tiny-{family}{suffix}"
        if not path.exists():
            shutil.copyfile(_tiny_checkpoint(family, suffix), path)  # a copy: tests may change or break it
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """app.py started the way a user starts it, in a subprocess."""

    def __init__(self, data_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.log = open(data_dir / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--data-dir", str(data_dir), "--port", str(self.port), *args],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.data_dir = data_dir

    def wait_ready(self, timeout: float = 120) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + (self.data_dir / "server.log").read_text())
            try:
                if requests.get(self.url + "/sdapi/v1/sd-models", timeout=2).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not start:\n" + (self.data_dir / "server.log").read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@contextlib.contextmanager
def running_server(data_dir: Path, *args: str) -> Iterator[Server]:
    """A started, answering :class:`Server`, stopped on exit however the block ends."""
    srv = Server(data_dir, *args)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def png_b64(image) -> str:
    """An image as the API's raw base64 PNG."""
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64(data: str):
    """The image in an API answer's base64 field."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))


def control_square():
    """A 64x64 black picture with a white rectangle: a control image every preprocessor can read."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((64, 64, 3), np.uint8)
    arr[16:48, 20:44] = 255
    return Image.fromarray(arr)


def guided_latents(studio, model, units, steps: int = 4):
    """Latents of one tiny 64x64 sampling pass (Euler, CFG 7, seed 5) with ControlNet/adapter ``units``."""
    from studio.controlnet.guidance import ControlNetGuidance
    from studio.generation.samplers import effective_schedule, split_sampler_name
    from studio.generation.sampling import BatchSpec, sample
    from studio.prompts.schedule import ConditioningPlan

    sampler, schedule = split_sampler_name("Euler", "Automatic")
    plan = ConditioningPlan(model.conditioner, "a house", "", steps, 1)
    spec = BatchSpec(plan=plan, sampler=sampler, schedule=effective_schedule(sampler, schedule), steps=steps,
                     cfg_scale=7.0, eta=None, width=64, height=64, seeds=[5],
                     callbacks=[ControlNetGuidance(units)])
    return studio.queue.run(lambda state: sample(model, spec, state))


class FixedPlan:
    """A conditioning plan with fixed (negative, positive) embeddings: the flow loop's ``plan`` interface."""

    def __init__(self, embeds, pooled):
        self.embeds, self.pooled, self.weights = embeds, pooled, [1.0]

    def at(self, step: int):
        return self.embeds, self.pooled


def flux_checkpoint(parts, family: str = "flux1"):
    """The LoadedModel attributes the flow loop and the unit callbacks read, for tiny FLUX.1 dev parts
    (``studio.testing.flux.tiny_flux_components``)."""
    from types import SimpleNamespace

    import torch

    from studio.devices import DevicePolicy
    from studio.families.spec import family_spec
    from studio.models.latent_codec import ScaleShiftCodec

    policy = DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, "sdpa", "test")
    return SimpleNamespace(spec=family_spec(family), policy=policy, probe=SimpleNamespace(variant="dev"),
                           previewer=None, unet=parts.transformer, vae=parts.vae,
                           latent_codec=ScaleShiftCodec(parts.vae))


def flux_latents(parts, callbacks=(), cfg: float = 1.0, steps: int = 3, size: int = 64, seed: int = 7,
                 guidance: float = 3.5, checkpoint=None):
    """Latents of one tiny FLUX.1 sampling pass (Euler, Simple) over ``parts.embeds`` / ``parts.pooled``
    with step ``callbacks`` (the unit guidances)."""
    from types import SimpleNamespace

    from studio.generation.flow_sampling import sample_flow
    from studio.generation.sampling import BatchSpec
    from studio.jobs import JobState

    spec = BatchSpec(plan=FixedPlan(parts.embeds, parts.pooled), sampler=SimpleNamespace(name="Euler"),
                     schedule=SimpleNamespace(name="simple"), steps=steps, cfg_scale=cfg, eta=None, width=size,
                     height=size, seeds=[seed], guidance=guidance, callbacks=list(callbacks))
    return sample_flow(checkpoint or flux_checkpoint(parts), spec, JobState("job", "test"))


def unit_ui_values(**unit_values):
    """The flat values a ControlNet unit's UI controls hand ``units_from_values``, defaults overridden."""
    from studio.ui.controlnet import UNIT_FIELDS

    base = dict(enabled=False, upload_independent=True, image=None, module="none", model="None", weight=1.0,
                guidance_start=0.0, guidance_end=1.0, pixel_perfect=False, processor_res=512, threshold_a=-1,
                threshold_b=-1, control_mode="Balanced", resize_mode="Crop and Resize", hr_option="Both",
                control_type="All", effective_region_mask=None)
    return [{**base, **unit_values}[name] for name in UNIT_FIELDS]
