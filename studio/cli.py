"""Command line: the same engine without a browser.

    python -m studio generate --prompt "a lighthouse at dusk" --steps 20 --out outputs/cli
    python -m studio generate -p "a red door" --init-image in.png --mask mask.png --out outputs/cli
    python -m studio upscale photo.png --upscaler 4x-UltraSharp --scale 2
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
    g.add_argument("--variation-seed", type=int, default=-1)
    g.add_argument("--variation-strength", type=float, default=0.0)
    g.add_argument("--tiling", action="store_true", help="seamless textures")
    i2i = g.add_argument_group("img2img / inpainting (give --init-image)")
    i2i.add_argument("--init-image", default=None, help="start from this image (img2img)")
    i2i.add_argument("--mask", default=None, help="inpaint where this mask is white")
    i2i.add_argument("--denoising-strength", type=float, default=0.75)
    i2i.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2, 3],
                     help="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    i2i.add_argument("--mask-blur", type=int, default=4)
    i2i.add_argument("--inpainting-fill", type=int, default=1, choices=[0, 1, 2, 3],
                     help="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    i2i.add_argument("--only-masked", action="store_true", help='inpaint area "Only masked"')
    i2i.add_argument("--padding", type=int, default=32, help="only-masked padding, pixels")
    i2i.add_argument("--invert-mask", action="store_true", help='"Inpaint not masked"')
    hr = g.add_argument_group("hires fix (txt2img)")
    hr.add_argument("--hires", action="store_true", help="second pass at --hr-scale")
    hr.add_argument("--hr-scale", type=float, default=2.0)
    hr.add_argument("--hr-upscaler", default="Latent")
    hr.add_argument("--hr-steps", type=int, default=0)
    hr.add_argument("--hr-denoising-strength", type=float, default=0.7)

    u = sub.add_parser("upscale", help="upscale images with an upscaler (Extras)")
    _common(u)
    u.add_argument("images", nargs="+")
    u.add_argument("--upscaler", default="Lanczos")
    u.add_argument("--scale", type=float, default=2.0)
    u.add_argument("--out", "-o", default=None, help="output folder (default outputs/extras-images)")

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
    fields = dict(
        prompt=ns.prompt, negative_prompt=ns.negative_prompt, steps=ns.steps, cfg_scale=ns.cfg_scale,
        width=ns.width, height=ns.height, seed=ns.seed, batch_size=ns.batch_size, n_iter=ns.batch_count,
        sampler_name=ns.sampler, scheduler=ns.scheduler, clip_skip=ns.clip_skip, checkpoint=checkpoint,
        styles=tuple(ns.style), vae=ns.vae, subseed=ns.variation_seed, subseed_strength=ns.variation_strength,
        tiling=ns.tiling, save_images=ns.out is None,
    )
    try:
        if ns.init_image:
            from studio.generation.outputs import ImageReadError, open_image
            from studio.generation.request import Img2ImgRequest

            try:
                init = open_image(Path(ns.init_image).read_bytes())
                mask = open_image(Path(ns.mask).read_bytes()) if ns.mask else None
            except (OSError, ImageReadError) as e:
                raise RequestError(str(e)) from e
            job = studio.submit_img2img(Img2ImgRequest(
                **fields, init_images=(init,), mask=mask, denoising_strength=ns.denoising_strength,
                resize_mode=ns.resize_mode, mask_blur_x=ns.mask_blur, mask_blur_y=ns.mask_blur,
                inpainting_fill=ns.inpainting_fill, inpaint_full_res=ns.only_masked,
                inpaint_full_res_padding=ns.padding, inpainting_mask_invert=ns.invert_mask))
        else:
            job = studio.submit_txt2img(Txt2ImgRequest(
                **fields, enable_hr=ns.hires, hr_scale=ns.hr_scale, hr_upscaler=ns.hr_upscaler,
                hr_second_pass_steps=ns.hr_steps, hr_denoising_strength=ns.hr_denoising_strength))
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


def cmd_upscale(ns: argparse.Namespace) -> int:
    from studio.core import Studio
    from studio.generation.outputs import ImageReadError, open_image, save_image
    from studio.generation.request import RequestError

    studio = Studio.create(_flags(ns))
    status = 0
    for name in ns.images:
        try:
            image = open_image(Path(name).read_bytes())
            out, info, path = studio.upscale_image(image, ns.upscaler, scale=ns.scale, save=ns.out is None)
        except (OSError, ImageReadError, RequestError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            status = 2
            continue
        if ns.out is not None:
            path = save_image(out, info, Path(ns.out), 0, dated=False)
        print(path)
    studio.queue.shutdown()
    return status


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
    commands = {"generate": cmd_generate, "models": cmd_models, "pnginfo": cmd_pnginfo, "upscale": cmd_upscale}
    return commands[ns.command](ns)


if __name__ == "__main__":
    raise SystemExit(main())
