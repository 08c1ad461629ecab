"""Command line: the same engine without a browser.

    python -m studio generate --prompt "a lighthouse at dusk" --steps 20 --out outputs/cli
    python -m studio models
    python -m studio pnginfo image.png
    python -m studio serve [app.py flags]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from studio.config import Flags, force_offline, parse_flags


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models-dir", default=None)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-half", action="store_true")
    p.add_argument("--no-demo", action="store_true")
    p.add_argument("--vae-dir", default=None)
    p.add_argument("--lora-dir", default=None)
    p.add_argument("--hypernetwork-dir", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img to a folder")
    _common(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--negative-prompt", "-n", default="")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg-scale", type=float, default=7.0)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--batch-count", type=int, default=1)
    g.add_argument("--sampler", default="DPM++ 2M")
    g.add_argument("--scheduler", default="Automatic")
    g.add_argument("--clip-skip", type=int, default=1)
    g.add_argument("--style", action="append", default=[], help="a style from styles.csv (repeatable)")
    g.add_argument("--checkpoint", "-m", default=None, help="title, name or hash; default: last used")
    g.add_argument("--vae", default=None,
                   help='"Automatic", "None" or a file from models/VAE; default: the sd_vae setting')
    g.add_argument("--out", "-o", default=None, help="output folder (default outputs/txt2img-images)")

    m = sub.add_parser("models", help="list checkpoints, VAEs, LoRAs, hypernetworks and embeddings")
    _common(m)
    m.add_argument("--kind", choices=["all", "checkpoints", "vae", "lora", "hypernetworks", "embeddings"],
                   default="all")

    i = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    i.add_argument("image")

    sub.add_parser("serve", help="start the web UI and API (same flags as app.py)", add_help=False)
    return parser


def _flags(ns: argparse.Namespace) -> Flags:
    return Flags(data_dir=ns.data_dir, models_dir=ns.models_dir, ckpt_dir=ns.ckpt_dir, device=ns.device,
                 no_half=ns.no_half, no_demo=ns.no_demo, vae_dir=ns.vae_dir, lora_dir=ns.lora_dir,
                 hypernetwork_dir=ns.hypernetwork_dir)


def cmd_generate(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.core import Studio
    from studio.generation.request import RequestError, Txt2ImgRequest
    from studio.models.manager import ModelNotFoundError
    from studio.models.state_dict import ModelFileError

    studio = Studio.create(_flags(ns))
    checkpoint = ns.checkpoint or studio.settings.get("sd_model_checkpoint")
    if checkpoint and not ns.checkpoint and studio.models.catalog.find(checkpoint) is None:
        checkpoint = None
    req = Txt2ImgRequest(
        prompt=ns.prompt, negative_prompt=ns.negative_prompt, steps=ns.steps, cfg_scale=ns.cfg_scale,
        width=ns.width, height=ns.height, seed=ns.seed, batch_size=ns.batch_size, n_iter=ns.batch_count,
        sampler_name=ns.sampler, scheduler=ns.scheduler, clip_skip=ns.clip_skip, checkpoint=checkpoint,
        styles=tuple(ns.style), vae=ns.vae,
        save_images=ns.out is None,
    )
    try:
        job = studio.submit_txt2img(req)
        bar = tqdm(total=0, unit="step", desc="txt2img", file=sys.stderr)
        while not job.done.wait(0.1):
            s = job.state
            total = s.total * max(s.batches, 1)
            if total and bar.total != total:
                bar.reset(total=total)
            bar.n = s.batch * s.total + s.step
            bar.refresh()
        bar.close()
        result = job.wait()
    except (RequestError, ModelFileError, ModelNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = result.paths
    if ns.out is not None:
        from studio.generation.outputs import save_image

        out = Path(ns.out)
        paths = [save_image(img, text, out, seed, dated=False)
                 for img, text, seed in zip(result.images, result.infotexts, result.seeds)]
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"model: {result.model.info.title} ({result.model.label})", file=sys.stderr)
    for p in paths:
        print(p)
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from studio.core import Studio

    studio = Studio.create(_flags(ns))
    def show(kind: str) -> bool:
        return ns.kind in ("all", kind)

    sections = []
    if show("checkpoints"):
        sections.append(("checkpoints", [f"{c.title}\t{c.path}" + ("\t(demo)" if c.is_demo else "")
                                         for c in studio.checkpoints()]))
    if show("vae"):
        sections.append(("vae", [f"{v.name}\t{v.path}" for v in studio.vaes.items()]))
    if show("lora"):
        sections.append(("lora", [f"{i.name}\t{i.family or '?'}\t{i.path}"
                                  + (f"\talias={i.alias}" if i.alias != i.name else "")
                                  for i in studio.networks.loras.items()]))
    if show("hypernetworks"):
        sections.append(("hypernetworks", [f"{i.name}\t{i.path}" for i in studio.networks.hypernetworks.items()]))
    if show("embeddings"):
        studio.embeddings.refresh()
        sections.append(("embeddings", [f"{name}\t{e.path}" for name, e in studio.embeddings.embeddings.items()]))
    for title, lines in sections:
        if ns.kind == "all":
            print(f"# {title}")
        for line in lines:
            print(line)
    return 0


def cmd_pnginfo(ns: argparse.Namespace) -> int:
    from studio.generation.outputs import ImageReadError, open_image, read_infotext

    try:
        image = open_image(Path(ns.image).read_bytes())
    except (OSError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = read_infotext(image)
    if not text:
        print("no generation parameters in this image", file=sys.stderr)
        return 1
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    force_offline()
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["serve"]:
        from studio.server import serve

        logging.getLogger().setLevel(logging.INFO)
        serve(parse_flags(argv[1:]))
        return 0
    ns = build_parser().parse_args(argv)
    return {"generate": cmd_generate, "models": cmd_models, "pnginfo": cmd_pnginfo}[ns.command](ns)


if __name__ == "__main__":
    raise SystemExit(main())
