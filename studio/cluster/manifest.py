"""Which model files a job needs on the worker that runs it, as FileRefs the front offers (the worker
fetches what its node lacks; studio.cluster.files). Computed on the front from the prepared request:
the checkpoint (and a hires / refiner checkpoint), the separate text encoders and VAE a split
checkpoint loads with, the VAE, the LoRAs and hypernetworks its prompts name, its ControlNet models,
and the embeddings (small; any of them may be named in a prompt).

A file outside the folders a worker mirrors (the built-in demo model, a diffusers folder) is not
listed: such a worker must see it through shared storage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.cluster.files import FileRef, file_ref
from studio.prompts.parser import extract_extra_networks

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


def _root_of(path: Path, roots: Iterable[Path]) -> Path | None:
    for root in roots:
        try:
            Path(path).resolve().relative_to(Path(root).resolve())
            return Path(root)
        except ValueError:
            continue
    return None


@dataclass
class ManifestBuilder:
    """The front's view of its model folders; ``hash_cache`` keeps each file's sha256 by mtime, so a
    multi-GB checkpoint is hashed once, not per job."""

    engine: Any

    def _ref(self, folder: str, roots: Sequence[Path], path: Path,
             sha256: str | None = None) -> tuple[FileRef, Path] | None:
        path = Path(path)
        if not path.is_file():
            return None
        root = _root_of(path, roots)
        if root is None:
            return None
        if sha256 is None:
            sha256 = self.engine.models.catalog.hash_cache.compute(f"file/{path}", path)
        return file_ref(folder, root, path, sha256), path

    def checkpoint(self, info: Any) -> list[tuple[FileRef, Path]]:
        if info is None or info.is_diffusers or info.is_demo:
            return []
        catalog = self.engine.models.catalog
        catalog.ensure_hash(info)
        out = [self._ref("Stable-diffusion", catalog.folders, info.path, info.sha256)]
        out += self._modules(info)
        return [r for r in out if r is not None]

    def _modules(self, info: Any) -> list[tuple[FileRef, Path] | None]:
        from studio.models.dit_loader import planned_modules

        models = self.engine.models
        try:
            available = list(models.modules())
            chosen = self.engine.settings.options.forge_additional_modules
            planned = planned_modules(info.path, available, chosen)
        except Exception as e:  # noqa: BLE001 - an unreadable file fails on the worker, with its own message
            log.debug("modules of %s: %s", info.path, e)
            return []
        names = set(planned.values())
        out = []
        for module in available:
            if module.name in names:
                folder = "VAE" if module.kind == "vae" else "text_encoder"
                root = module.path.parent
                for _ in Path(module.name).parts[1:]:
                    root = root.parent
                out.append(self._ref(folder, [root], module.path))
        return out

    def request(self, req: Any, options: Any, checkpoint: Any) -> list[tuple[FileRef, Path]]:
        e = self.engine
        refs = list(self.checkpoint(checkpoint))
        for name in ("hr_checkpoint_name", "refiner_checkpoint"):
            wanted = getattr(req, name, None)
            if wanted:
                refs += self.checkpoint(e.models.catalog.find(wanted))
        vae_setting = req.vae if getattr(req, "vae", None) is not None else options.sd_vae
        try:
            vae = e.vaes.resolve(vae_setting, checkpoint.path if checkpoint is not None else None)
        except Exception:  # noqa: BLE001 - the worker reports a bad VAE name as the engine does
            vae = None
        if vae is not None:
            refs.append(self._ref("VAE", [e.paths.vae, *e.paths.ckpt_dirs], vae.path))
        prompts = [getattr(req, k, "") or "" for k in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")]
        for prompt in prompts:
            for tag in extract_extra_networks(prompt)[1]:
                if tag.kind in ("lora", "lyco"):
                    found = e.networks.loras.find(tag.name)
                    if found is not None:
                        refs.append(self._ref("Lora", e.paths.lora_dirs, found.path))
                elif tag.kind == "hypernet":
                    found = e.networks.hypernetworks.find(tag.name)
                    if found is not None:
                        refs.append(self._ref("hypernetworks", e.paths.hypernetwork_dirs, found.path))
        for unit in getattr(req, "controlnet_units", ()) or ():
            if unit.enabled and unit.model and unit.model != "None":
                found = e.controlnets.library.find(unit.model)
                if found is not None and not found.is_diffusers:
                    refs.append(self._ref("ControlNet", e.paths.controlnet_dirs, found.path))
        for folder in e.paths.embedding_dirs:
            if Path(folder).is_dir():
                for path in sorted(Path(folder).rglob("*")):
                    if path.suffix.lower() in MODEL_SUFFIXES and not path.name.startswith("."):
                        refs.append(self._ref("embeddings", [folder], path))
        unique: dict[tuple[str, str], tuple[FileRef, Path]] = {}
        for item in refs:
            if item is not None:
                unique.setdefault((item[0].folder, item[0].relpath), item)
        return list(unique.values())
