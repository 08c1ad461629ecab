"""External VAE files, chosen as A1111 chooses them (``modules/sd_vae.py``).

Candidates are ``<vae dir>/**/*.{ckpt,pt,safetensors}`` and ``*.vae.{ckpt,pt,safetensors}``
anywhere under the checkpoint folders. The ``sd_vae`` setting is "Automatic", "None" or a
file name: "None" keeps the VAE baked into the checkpoint; "Automatic" takes
``<checkpoint stem>.vae.<ext>`` beside the checkpoint, else a candidate whose file name starts
with the checkpoint's stem, else the baked VAE.

Swapping writes the new weights into the loaded ``AutoencoderKL`` in place (no rebuild, so
dtype, device and memory format stay), after checking every key and shape, and keeps a CPU
copy of the baked weights so that "None" restores them bit for bit.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.models.catalog import HashCache, sha256_file
from studio.models.state_dict import ModelFileError, load_state_dict

if TYPE_CHECKING:
    import torch
    from torch import Tensor

log = logging.getLogger(__name__)

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
AUTOMATIC = "Automatic"
NONE = "None"
# Lightning checkpoints prefix the VAE with first_stage_model.; some exports use vae.
_PREFIXES = ("first_stage_model.", "vae.")
# Training leftovers that standalone VAE files cut from a checkpoint keep.
_EXTRA_PREFIXES = ("model_ema.", "loss.")
# diffusers < 0.14 named the mid-block attention like this; some shared files still do.
_OLD_DIFFUSERS_ATTENTION = (
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0."),
)
_PARSED_CACHE_SIZE = 2


class VaeNotFoundError(ValueError):
    """An ``sd_vae`` value that names no known VAE file."""

    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        listed = ", ".join(available) if available else "none found"
        super().__init__(f"VAE {name!r} not found; available: {listed}")


def _natural_key(text: str) -> list[Any]:
    # "vae2" before "vae10", as A1111's natural sort lists them.
    return [(0, int(part)) if part.isdigit() else (1, part.lower()) for part in re.split(r"(\d+)", text)]


@dataclass(eq=False)
class VaeInfo:
    path: Path
    name: str                  # what the UI lists and the infotext "VAE:" field carries
    hash_cache: HashCache | None = field(default=None, repr=False)
    _digest: tuple[float, str] | None = field(default=None, init=False, repr=False)

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def sha256(self) -> str:
        """Full-file sha256, computed on first use and cached by mtime (A1111's cache.json key
        ``vae/<name>``), because hashing a 300 MB file is not free."""
        mtime = self.path.stat().st_mtime
        if self._digest is not None and self._digest[0] == mtime:
            return self._digest[1]
        if self.hash_cache is not None:
            digest = self.hash_cache.compute(f"vae/{self.name}", self.path)
        else:
            digest = sha256_file(self.path)
        self._digest = (mtime, digest)
        return digest

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    def api_dict(self) -> dict[str, str]:
        """An item of A1111's GET /sdapi/v1/sd-vae."""
        return {"model_name": self.name, "filename": str(self.path)}


def _is_vae_candidate(path: Path, in_vae_dir: bool) -> bool:
    name = path.name.lower()
    if not name.endswith(VAE_SUFFIXES):
        return False
    return in_vae_dir or any(name.endswith(".vae" + suffix) for suffix in VAE_SUFFIXES)


def _walk(root: Path, in_vae_dir: bool) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and _is_vae_candidate(path, in_vae_dir):
            found.append(path)
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.name.rsplit(".", 1)[0]


class VaeCatalog:
    def __init__(self, vae_dir: Path, ckpt_dirs: tuple[Path, ...], hash_cache: HashCache | None = None):
        self.vae_dir = Path(vae_dir)
        self.ckpt_dirs = tuple(Path(d) for d in ckpt_dirs)
        self.hash_cache = hash_cache
        self._lock = threading.Lock()
        self._items: list[VaeInfo] = []

    def refresh(self) -> list[VaeInfo]:
        by_name: dict[str, VaeInfo] = {}
        seen: set[Path] = set()
        # (root, names relative to root?) pairs; models/VAE keeps its sub-folders in the name
        # so same-named files in two sub-folders stay apart.
        roots = [(self.vae_dir, True)] + [(d, False) for d in self.ckpt_dirs]
        for root, in_vae_dir in roots:
            for path in _walk(root, in_vae_dir):
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                rel = path.relative_to(root).as_posix()
                for name in ((rel,) if in_vae_dir else (path.name, rel)) + (path.as_posix(),):
                    if name not in by_name:
                        by_name[name] = VaeInfo(path=path, name=name, hash_cache=self.hash_cache)
                        break
        items = sorted(by_name.values(), key=lambda v: _natural_key(v.name))
        with self._lock:
            self._items = items
        return list(items)

    def items(self) -> list[VaeInfo]:
        with self._lock:
            return list(self._items)

    def names(self) -> list[str]:
        return [v.name for v in self.items()]

    def choices(self) -> list[str]:
        """The ``sd_vae`` dropdown."""
        return [AUTOMATIC, NONE, *self.names()]

    def find(self, name: str) -> VaeInfo | None:
        """By listed name, then by bare file name (what A1111 writes as ``VAE:`` in infotexts),
        then by name without extension, then by short hash."""
        query = (name or "").strip()
        if not query:
            return None
        items = self.items()
        for getter in (lambda v: v.name, lambda v: v.filename, lambda v: v.filename.rsplit(".", 1)[0]):
            for item in items:
                if getter(item) == query:
                    return item
        lowered = query.lower()
        for item in items:
            if lowered in (item.name.lower(), item.filename.lower()):
                return item
        if re.fullmatch(r"[0-9a-fA-F]{10}", query):
            # Only hashes already in cache.json: hashing every file to answer a lookup is too slow.
            for item in items:
                if self.hash_cache is not None and (
                    (digest := self.hash_cache.get(f"vae/{item.name}", item.path)) and digest[:10] == lowered
                ):
                    return item
        return None

    def near_checkpoint(self, checkpoint_path: Path) -> VaeInfo | None:
        """A1111's "Automatic" choice for ``checkpoint_path``, or None for the baked VAE."""
        checkpoint_path = Path(checkpoint_path)
        stem = _stem(checkpoint_path)
        folder = checkpoint_path.parent
        items = self.items()
        # The exact "<stem>.vae.<ext>" beside the checkpoint wins, even when that folder is not
        # scanned (a checkpoint opened from elsewhere).
        for suffix in VAE_SUFFIXES:
            exact = folder / f"{stem}.vae{suffix}"
            if exact.is_file():
                for item in items:
                    if item.path.resolve() == exact.resolve():
                        return item
                return VaeInfo(path=exact, name=exact.name, hash_cache=self.hash_cache)
        matches = [item for item in items if item.filename.startswith(stem)]
        if not matches:
            return None
        beside = [item for item in matches if item.path.parent.resolve() == folder.resolve()]
        return (beside or matches)[0]

    def resolve(self, setting: str | None, checkpoint_path: Path | None) -> VaeInfo | None:
        """The VAE file the ``sd_vae`` setting picks for this checkpoint; None means the baked
        one. Raises :class:`VaeNotFoundError` for a name that is not listed."""
        value = (setting or "").strip()
        if not value or value.lower() == NONE.lower():
            return None
        if value.lower() in ("automatic", "auto"):
            return self.near_checkpoint(checkpoint_path) if checkpoint_path is not None else None
        found = self.find(value)
        if found is None:
            raise VaeNotFoundError(value, self.names())
        return found


# --------------------------------------------------------------------------- file contents


def _strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        # A full checkpoint holds its VAE under first_stage_model.; the rest is not ours.
        if any(k.startswith(("encoder.", "decoder.")) for k in sub):
            return sub
    return sd


def is_diffusers_vae(sd: dict[str, Tensor]) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in sd)


def _what_is_it(keys: list[str]) -> str:
    if any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "it looks like a LoRA"
    if any(k.startswith(("model.diffusion_model.", "down_blocks.", "input_blocks.")) for k in keys):
        return "it looks like a UNet or a checkpoint without a VAE"
    if any(k.startswith(("cond_stage_model.", "text_model.", "conditioner.")) for k in keys):
        return "it looks like a text encoder"
    return "no encoder/decoder weights found"


def _modernise_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        if ".mid_block.attentions." in key:
            for old, new in _OLD_DIFFUSERS_ATTENTION:
                key = key.replace(old, new)
            # Conv-shaped (1x1) attention projections, as LDM stores them, become linear.
            if key.endswith(".weight") and ".group_norm." not in key and value.ndim > 2:
                value = value.reshape(value.shape[0], value.shape[1])
        out[key] = value
    return out


def read_vae_state_dict(path: Path) -> dict[str, Tensor]:
    """The weights of a VAE file, with no prefix and no training extras: LDM names
    (``encoder.down.0.block.0…``) or, for diffusers-layout files, diffusers names
    (``encoder.down_blocks.0.resnets.0…``); :func:`is_diffusers_vae` tells which.
    Files that are not a VAE raise :class:`ModelFileError`."""
    path = Path(path)
    raw = load_state_dict(path)
    sd = {k: v for k, v in _strip_prefix(raw).items() if not k.startswith(_EXTRA_PREFIXES)}
    if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
        raise ModelFileError(f"{path.name}: not a VAE file ({_what_is_it(list(raw))})")
    return _modernise_diffusers(sd) if is_diffusers_vae(sd) else sd


def to_diffusers_vae(sd: dict[str, Tensor], config: Any, label: str = "VAE") -> dict[str, Tensor]:
    """``sd`` from :func:`read_vae_state_dict` in the names of a diffusers ``AutoencoderKL``
    with ``config``. LDM names go through diffusers' own converter."""
    if is_diffusers_vae(sd):
        return dict(sd)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # The converter looks up a prefix from its own list and otherwise treats every key as
    # the VAE's, which is what a bare dict needs; it only reads the block type lists.
    block_types = {key: list(config[key]) for key in ("down_block_types", "up_block_types")}
    try:
        return convert_ldm_vae_checkpoint(sd, block_types)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
        raise ModelFileError(f"{label}: VAE weights could not be converted ({e!r})") from e


def check_fits(sd: dict[str, Tensor], target: dict[str, Tensor], label: str) -> None:
    """Every key present and every shape equal, so a load never half-applies."""
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    wrong = sorted(k for k in set(sd) & set(target) if tuple(sd[k].shape) != tuple(target[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(sd[k].shape)} in the file, "
                     f"{tuple(target[k].shape)} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    raise ModelFileError(f"{label}: this VAE does not fit the loaded model: " + "; ".join(parts))


# --------------------------------------------------------------------------- swapping


class VaeSwapper:
    """Puts external VAE weights into one loaded model's ``AutoencoderKL`` and back."""

    def __init__(self, vae: torch.nn.Module):
        self.vae = vae
        self._lock = threading.Lock()
        self._baked: dict[str, Tensor] | None = None
        self._current: VaeInfo | None = None
        self._current_key: tuple[str, float] | None = None
        self._parsed: dict[tuple[str, float], dict[str, Tensor]] = {}

    @property
    def current(self) -> VaeInfo | None:
        return self._current

    def _file_key(self, path: Path) -> tuple[str, float]:
        try:
            return str(path.resolve()), path.stat().st_mtime
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read VAE file: {e}") from e

    def _read(self, info: VaeInfo, key: tuple[str, float]) -> dict[str, Tensor]:
        if key in self._parsed:
            return self._parsed[key]
        sd = read_vae_state_dict(info.path)
        # Stale entries of the same file (older mtime) are useless; then keep the newest few.
        for old in [k for k in self._parsed if k[0] == key[0]]:
            del self._parsed[old]
        self._parsed[key] = sd
        while len(self._parsed) > _PARSED_CACHE_SIZE:
            del self._parsed[next(iter(self._parsed))]
        return sd

    def apply(self, info: VaeInfo | None) -> bool:
        """Make the model use ``info`` (None: the baked VAE). Returns whether weights changed.
        On :class:`ModelFileError` the VAE is left as it was."""
        with self._lock:
            if info is None:
                if self._current is None:
                    return False
                assert self._baked is not None
                self._load(self._baked)
                log.info("VAE: restored the checkpoint's own VAE")
                self._current, self._current_key = None, None
                return True
            key = self._file_key(Path(info.path))
            if key == self._current_key:
                self._current = info
                return False
            sd = to_diffusers_vae(self._read(info, key), self.vae.config, info.name)
            target = self.vae.state_dict()
            check_fits(sd, target, info.name)
            if self._baked is None:
                self._baked = {k: v.detach().to("cpu", copy=True) for k, v in target.items()}
            self._load(sd)
            self._current, self._current_key = info, key
            log.info("VAE: loaded %s", info.path)
            return True

    def _load(self, sd: dict[str, Tensor]) -> None:
        # In place, so the module keeps its dtype, device and channels_last layout.
        import torch
        with torch.no_grad():
            self.vae.load_state_dict(sd, strict=True)
