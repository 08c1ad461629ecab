"""Command-line flags (A1111 names), folder layout and persisted settings.

Flags are parsed once into an immutable :class:`Flags`; folders derive from them in
:class:`Paths`; user settings live in ``config.json`` under the data dir and are
written atomically so a crash mid-write never loses them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.options import OPTION_KEYS, StudioOptions, options_from_stored, validate_changes

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def force_offline() -> None:
    """Nothing may reach a hub: make any accidental hub call fail at once. Must run before
    huggingface_hub is imported, because it reads these variables at import time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Folder names follow A1111 so an existing models/ tree can be pointed at directly.
MODEL_FOLDERS = (
    "Stable-diffusion",
    "VAE",
    "Lora",
    "hypernetworks",
    "ControlNet",
    "annotators",
    "ESRGAN",
    "embeddings",
)


@dataclass(frozen=True)
class Flags:
    listen: bool = False
    port: int = 7860
    server_name: str | None = None
    share: bool = False
    gradio_auth: str | None = None
    api: bool = False
    nowebui: bool = False
    ckpt_dir: str | None = None
    embeddings_dir: str | None = None
    vae_dir: str | None = None
    lora_dir: str | None = None
    hypernetwork_dir: str | None = None
    medvram: bool = False
    medvram_sdxl: bool = False
    lowvram: bool = False
    styles_file: str | None = None
    data_dir: str | None = None
    models_dir: str | None = None
    skip_load_model_at_start: bool = False
    no_half: bool = False
    no_half_vae: bool = False
    precision: str = "autocast"
    device: str | None = None
    xformers: bool = False
    opt_split_attention: bool = False
    opt_channelslast: bool = False
    no_hashing: bool = False
    no_demo: bool = False
    inbrowser: bool = False
    controlnet_dir: str | None = None
    text_encoder_dir: str | None = None
    extra_model_paths_config: str | None = None
    enable_insecure_extension_access: bool = False
    api_auth: str | None = None
    api_server_stop: bool = False
    cors_allow_origins: str | None = None
    cors_allow_origins_regex: str | None = None
    # generation workers on Ray Serve (studio.cluster); 0 and no address = no Ray at all
    workers: int = 0
    ray_address: str | None = None
    worker_threads: int = 0            # CPU threads per worker (0 = the cores shared out)
    worker_gpus: float | None = None   # GPUs per worker (None = 1 where the cluster has GPUs, else 0)
    worker_models: int = 2             # checkpoints a worker keeps loaded
    worker_data_dir: str | None = None  # a node-local folder for the workers' models (None = the front's)
    ray_dashboard: bool = False

    @property
    def extension_install_allowed(self) -> bool:
        """A1111's rule: installing extensions runs foreign code, so it is off when the server is
        reachable by others (--listen, --share) unless the user opts in."""
        return self.enable_insecure_extension_access or not (self.listen or self.share)

    @property
    def host(self) -> str:
        if self.server_name:
            return self.server_name
        return "0.0.0.0" if self.listen else "127.0.0.1"

    def as_cmd_flags(self) -> dict[str, Any]:
        """The dict served by GET /sdapi/v1/cmd-flags (A1111 uses argparse dest names)."""
        return dict(self.__dict__)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py", description="Stable Diffusion studio: web UI and A1111-compatible API."
    )
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (reachable from the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--server-name", default=None, help="host name or address to bind")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
    p.add_argument("--gradio-auth", default=None, help='UI logins, "user:pass[,user2:pass2]"')
    p.add_argument("--api", action="store_true", help="serve /sdapi/v1 next to the UI (always on)")
    p.add_argument("--nowebui", action="store_true", help="serve only the REST API")
    p.add_argument("--ckpt-dir", default=None, help="extra folder scanned for checkpoints")
    p.add_argument("--embeddings-dir", default=None, help="extra folder scanned for textual-inversion embeddings")
    p.add_argument("--vae-dir", default=None, help="VAE folder (default models/VAE)")
    p.add_argument("--lora-dir", default=None, help="LoRA / LyCORIS folder (default models/Lora)")
    p.add_argument("--hypernetwork-dir", default=None, help="hypernetwork folder (default models/hypernetworks)")
    p.add_argument("--text-encoder-dir", default=None,
                   help="extra folder of text encoders (clip_l, clip_g, t5xxl) for SD3/FLUX files that lack them")
    p.add_argument("--extra-model-paths-config", default=None,
                   help="ComfyUI's extra_model_paths.yaml (default: <data-dir>/extra_model_paths.yaml when present)")
    p.add_argument("--medvram", action="store_true",
                   help="small GPUs: keep models in RAM, move one component at a time to the GPU")
    p.add_argument("--medvram-sdxl", action="store_true", help="--medvram for SDXL models only")
    p.add_argument("--lowvram", action="store_true",
                   help="very small GPUs: like --medvram, block by block (slow)")
    p.add_argument("--styles-file", default=None, help="prompt styles CSV (default <data-dir>/styles.csv)")
    p.add_argument("--data-dir", default=None, help="where settings, caches and outputs live")
    p.add_argument("--models-dir", default=None, help="models root (default: <repo>/models)")
    p.add_argument("--skip-load-model-at-start", action="store_true")
    p.add_argument("--no-half", action="store_true", help="keep weights in float32")
    p.add_argument("--no-half-vae", action="store_true", help="keep the VAE in float32")
    p.add_argument(
        "--precision", choices=["autocast", "full", "half", "bf16"], default="autocast",
        help="'full' = float32 everywhere; 'autocast' = the device policy",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument("--xformers", action="store_true", help="use xformers attention on CUDA")
    p.add_argument("--opt-split-attention", action="store_true",
                   help="compute attention in slices: less memory, slower; replaces SDPA (off by default)")
    p.add_argument("--opt-channelslast", action="store_true",
                   help="channels_last memory layout everywhere (default: only where measured faster, CPU bf16)")
    p.add_argument("--no-hashing", action="store_true", help="do not compute sha256 of checkpoints")
    p.add_argument("--no-demo", action="store_true", help="do not offer the built-in demo model")
    p.add_argument("--inbrowser", action="store_true", help="open the UI in the default browser")
    p.add_argument("--controlnet-dir", default=None, help="ControlNet model folder (default models/ControlNet)")
    p.add_argument("--enable-insecure-extension-access", action="store_true",
                   help="allow installing extensions from the UI/API even with --listen or --share")
    p.add_argument("--api-auth", default=None,
                   help='HTTP Basic logins for the REST API, "user:pass[,user2:pass2]"')
    p.add_argument("--api-server-stop", action="store_true",
                   help="enable POST /sdapi/v1/server-stop, /server-kill and /server-restart")
    p.add_argument("--cors-allow-origins", default=None,
                   help='origins allowed to call the server from a browser, "http://a.com,http://b.com"')
    p.add_argument("--cors-allow-origins-regex", default=None,
                   help="a regular expression of origins allowed to call the server from a browser")
    g = p.add_argument_group("generation workers (Ray Serve; pip install -e .[cluster])")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run N generation workers on a local Ray cluster (one per GPU, or a share of the CPU "
                        "cores each) behind this one UI and API; 0 = generate in this process")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help='join an existing Ray cluster ("auto", "HOST:6379", a KubeRay head) instead of starting one; '
                        "--workers then defaults to the cluster's GPU count")
    g.add_argument("--worker-threads", type=int, default=0, metavar="K",
                   help="torch CPU threads per worker (default: the machine's cores / N)")
    g.add_argument("--worker-gpus", type=float, default=None, metavar="F",
                   help="GPUs per worker (default 1 when the cluster has GPUs, else 0; 0.5 puts two on a GPU)")
    g.add_argument("--worker-models", type=int, default=2, metavar="M",
                   help="checkpoints each worker keeps loaded (requests are routed to a worker that has theirs)")
    g.add_argument("--worker-data-dir", default=None, metavar="DIR",
                   help="a folder on each node where workers keep model files fetched from this machine "
                        "(default: this studio's data dir, i.e. shared storage)")
    g.add_argument("--ray-dashboard", action="store_true",
                   help="start Ray's dashboard with the local cluster (its link shows in the Workers panel)")
    return p


def parse_flags(argv: list[str] | None = None) -> Flags:
    ns = build_arg_parser().parse_args(argv)
    return Flags(**vars(ns))


@dataclass(frozen=True)
class Paths:
    data: Path
    models: Path
    ckpt_dirs: tuple[Path, ...]
    embedding_dirs: tuple[Path, ...] = ()
    styles_file: Path | None = None
    vae_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    hypernetwork_dirs: tuple[Path, ...] = ()
    controlnet_dirs: tuple[Path, ...] = ()        # ControlNets, adapters (+ models/ipadapter, models/style_models)
    clip_vision_dirs: tuple[Path, ...] = ()       # IP-Adapters' image encoders
    text_encoder_dirs: tuple[Path, ...] = ()     # --text-encoder-dir (models/text_encoder(s), models/clip are read too)
    extra_model_paths: Path | None = None        # ComfyUI's extra_model_paths.yaml

    @classmethod
    def from_flags(cls, flags: Flags) -> Paths:
        data = Path(flags.data_dir).expanduser().resolve() if flags.data_dir else REPO_ROOT
        if flags.models_dir:
            models = Path(flags.models_dir).expanduser().resolve()
        else:
            models = data / "models"
        # ComfyUI's folders for transformer-only files (FLUX, SD3.5) are checkpoints here too
        ckpt = [models / "Stable-diffusion", models / "diffusion_models", models / "unet"]
        if flags.ckpt_dir:
            ckpt.append(Path(flags.ckpt_dir).expanduser().resolve())
        # A1111 reads a top-level embeddings/ folder; models/embeddings is read too
        emb = [data / "embeddings", models / "embeddings"]
        if flags.embeddings_dir:
            emb.append(Path(flags.embeddings_dir).expanduser().resolve())
        styles = Path(flags.styles_file).expanduser().resolve() if flags.styles_file else data / "styles.csv"

        def folders(default: str, flag: str | None) -> tuple[Path, ...]:
            # As in A1111, --vae-dir / --lora-dir / --hypernetwork-dir replace the default folder.
            return (Path(flag).expanduser().resolve(),) if flag else (models / default,)

        return cls(data=data, models=models, ckpt_dirs=tuple(ckpt), embedding_dirs=tuple(emb), styles_file=styles,
                   vae_dirs=folders("VAE", flags.vae_dir), lora_dirs=folders("Lora", flags.lora_dir),
                   hypernetwork_dirs=folders("hypernetworks", flags.hypernetwork_dir),
                   # ComfyUI keeps IP-Adapters in models/ipadapter; the A1111 extension in ControlNet/
                   controlnet_dirs=(*folders("ControlNet", flags.controlnet_dir), models / "ipadapter",
                                    models / "style_models"),   # ComfyUI's folder for FLUX.1 Redux
                   clip_vision_dirs=(models / "clip_vision", models / "annotators" / "clip_vision"),
                   text_encoder_dirs=(Path(flags.text_encoder_dir).expanduser().resolve(),)
                   if flags.text_encoder_dir else (),
                   extra_model_paths=Path(flags.extra_model_paths_config).expanduser().resolve()
                   if flags.extra_model_paths_config else data / "extra_model_paths.yaml")

    @property
    def vae(self) -> Path:
        return self.vae_dirs[0] if self.vae_dirs else self.models / "VAE"

    @property
    def outputs(self) -> Path:
        return self.data / "outputs"

    @property
    def cache_dir(self) -> Path:
        return self.data / "cache"

    @property
    def settings_file(self) -> Path:
        return self.data / "config.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.data / "cache.json"

    def ensure(self) -> None:
        for sub in MODEL_FOLDERS:
            (self.models / sub).mkdir(parents=True, exist_ok=True)
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.data)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp)`` on a hidden temporary file beside ``path``, fsync it, then rename it over
    ``path``: a reader, a crash or a full disk leaves the old file or the new one, never half of one.
    The name starts with "." (and ends in ".tmp") so model-folder scans never list a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


# atomic_write's temporary names: "." + target name + "." + tempfile's 8 random characters + ".tmp".
ATOMIC_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
STALE_TEMP_AGE_S = 60.0


def remove_stale_temp_files(folder: Path, older_than_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete :func:`atomic_write` temporary files in ``folder`` (not below it) last modified more than
    ``older_than_s`` ago: a save that was killed between writing and renaming leaves one behind
    (``.config.json.k3j9x_2a.tmp``) forever. Younger ones may belong to a save in progress and are kept,
    as is anything whose name does not have exactly that shape, and anything that is not a plain
    file. Returns what was deleted; never raises (a file that cannot be removed stays)."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not ATOMIC_TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime <= older_than_s:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


@dataclass
class Settings:
    """User settings persisted to config.json, held as one typed :class:`StudioOptions`. Every change
    is validated (studio.options.validate_changes) before it is applied or written. Keys the studio
    does not know (a config.json copied from A1111) are kept in the file, untouched, but not used."""

    path: Path
    options: StudioOptions = field(default_factory=StudioOptions)
    foreign: dict[str, Any] = field(default_factory=dict)   # unknown keys from the file, written back as is
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path) -> Settings:
        stored: dict[str, Any] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                stored = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                # A corrupt settings file must not stop the studio; keep it for the user.
                path.replace(path.with_suffix(".json.corrupt"))
        options, problems = options_from_stored(stored)
        for problem in problems:
            log.warning("config.json: %s; using the default", problem)
        return cls(path=path, options=options, foreign={k: v for k, v in stored.items() if k not in OPTION_KEYS})

    def get(self, key: str, default: Any = None) -> Any:
        """One option's value (``default`` for a key the studio does not have)."""
        with self._lock:
            return getattr(self.options, key) if key in OPTION_KEYS else default

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.options.model_dump()

    def update(self, changes: dict[str, Any], persist: bool = True) -> dict[str, Any]:
        """Validate ``changes`` (RequestError on an unknown key or a bad value; nothing changes then),
        apply them and write config.json atomically. Returns the validated changes."""
        with self._lock:
            checked = validate_changes(changes, self.options)
            self.options = self.options.model_copy(update=checked)
            text = json.dumps({**self.foreign, **self.options.model_dump()}, indent=2, ensure_ascii=False)
        if persist:
            atomic_write_text(self.path, text)
        return checked
