"""Command line: the same engine without a browser.

    python -m studio generate --prompt "a lighthouse at dusk" --steps 20 --out outputs/cli
    python -m studio generate -p "a red door" --init-image in.png --mask mask.png --out outputs/cli
    python -m studio generate -p "a castle" --out outputs/cli --save-detected-maps \
        --controlnet "model=control_canny,module=canny,image=edges.png,weight=0.8,guidance_end=0.6"
    python -m studio upscale photo.png --upscaler 4x-UltraSharp --scale 2
    python -m studio detect --module canny --out maps photo.png --processor-res 512 --threshold-a 100
    python -m studio preprocessors
    python -m studio models [--kind controlnet]
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
    p.add_argument("--controlnet-dir", default=None, help="ControlNet model folder (default models/ControlNet)")


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
    cn = g.add_argument_group("ControlNet")
    cn.add_argument("--controlnet", action="append", default=[], metavar="SPEC",
                    help="a ControlNet unit as comma-separated key=value pairs with the sd-webui-controlnet API "
                         "field names, e.g. \"model=control_canny,module=canny,image=edges.png,weight=0.8\" "
                         "(image and mask are file paths; without image the --init-image is used; "
                         "enums take their text or index). Repeat for more units. "
                         f"Keys: {', '.join(UNIT_KEYS)}")
    cn.add_argument("--save-detected-maps", action="store_true",
                    help="also save each unit's preprocessed map next to the images "
                         "(<first image name>-controlnet-<unit>.png)")

    u = sub.add_parser("upscale", help="upscale images with an upscaler (Extras)")
    _common(u)
    u.add_argument("images", nargs="+")
    u.add_argument("--upscaler", default="Lanczos")
    u.add_argument("--scale", type=float, default=2.0)
    u.add_argument("--out", "-o", default=None, help="output folder (default outputs/extras-images)")

    d = sub.add_parser("detect", help="run a ControlNet preprocessor on images and save the maps")
    _common(d)
    d.add_argument("images", nargs="+")
    d.add_argument("--module", required=True, help="preprocessor name (see: python -m studio preprocessors)")
    d.add_argument("--processor-res", type=int, default=-1, help="short side of the map; -1: the default")
    d.add_argument("--threshold-a", type=float, default=-1, help="the preprocessor's slider 1; -1: default")
    d.add_argument("--threshold-b", type=float, default=-1, help="the preprocessor's slider 2; -1: default")
    d.add_argument("--out", "-o", default=None, help="output folder (default outputs/detected_maps)")

    pp = sub.add_parser("preprocessors", help="list ControlNet preprocessors, their sliders and weight files")
    _common(pp)

    m = sub.add_parser("models", help="list checkpoints, VAEs, LoRAs, hypernetworks, embeddings and ControlNets")
    _common(m)
    m.add_argument("--kind", default="all",
                   choices=["all", "checkpoints", "vae", "lora", "hypernetworks", "embeddings", "controlnet"])

    i = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    i.add_argument("image")

    sub.add_parser("serve", help="start the web UI and API (same flags as app.py)", add_help=False)
    return parser


def _flags(ns: argparse.Namespace) -> Flags:
    return Flags(data_dir=ns.data_dir, models_dir=ns.models_dir, ckpt_dir=ns.ckpt_dir, device=ns.device,
                 no_half=ns.no_half, no_demo=ns.no_demo, vae_dir=ns.vae_dir, lora_dir=ns.lora_dir,
                 hypernetwork_dir=ns.hypernetwork_dir, controlnet_dir=ns.controlnet_dir)


# The unit fields a --controlnet SPEC may set (sd-webui-controlnet's names), and the old names the API
# also takes.
UNIT_KEYS = ("model", "module", "image", "mask", "weight", "resize_mode", "processor_res", "threshold_a",
             "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option",
             "low_vram", "enabled", "save_detected_map")
_UNIT_KEY_ALIASES = ("guidance", "lowvram", "input_image", "mask_image")
_ENUM_KEYS = ("resize_mode", "control_mode", "hr_option")
_BOOL_KEYS = ("pixel_perfect", "low_vram", "lowvram", "enabled", "save_detected_map")
_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


def _split_spec(spec: str) -> list[tuple[str, str]]:
    """``key=value,key=value`` -> pairs. A piece without ``=`` continues the previous value, so a
    path with a comma in it still works."""
    pairs: list[tuple[str, str]] = []
    for piece in spec.split(","):
        key, sep, value = piece.partition("=")
        if not sep:
            if pairs:
                pairs[-1] = (pairs[-1][0], f"{pairs[-1][1]},{piece}")
                continue
            if not piece.strip():
                continue
            raise ValueError(f"expected key=value, got {piece.strip()!r}")
        pairs.append((key.strip().lower().replace("-", "_"), value))
    return pairs


def parse_controlnet_spec(spec: str, index: int, notes: list[str] | None = None):
    """One ``--controlnet`` SPEC -> a ControlNetUnitRequest, through the API's own parser so the
    values mean what they mean in ``alwayson_scripts.controlnet``. Raises RequestError (with the
    unit's number) for unknown keys, bad values and image files that cannot be read."""
    from studio.controlnet.units import UnitError, unit_from_api
    from studio.generation.outputs import ImageReadError, open_image

    def fail(message: str) -> UnitError:
        return UnitError(f"ControlNet unit {index}: {message}")

    try:
        pairs = _split_spec(spec)
    except ValueError as e:
        raise fail(f"{e} in --controlnet {spec!r}") from None
    values: dict[str, object] = {}
    for key, value in pairs:
        if key not in UNIT_KEYS and key not in _UNIT_KEY_ALIASES:
            raise fail(f"unknown key {key!r} in --controlnet; valid keys: {', '.join(UNIT_KEYS)}")
        if key in values:
            raise fail(f"{key!r} is given twice in --controlnet")
        value = value.strip()
        if key in _ENUM_KEYS and value.isdigit():
            values[key] = int(value)  # the API takes an enum's index as a number
        elif key in _BOOL_KEYS and value.lower() not in _BOOL_WORDS:
            raise fail(f"{key} must be true or false (got {value!r})")
        else:
            values[key] = value

    def read(path_text: str):
        path = Path(path_text).expanduser()
        try:
            return open_image(path.read_bytes())
        except FileNotFoundError:
            raise fail(f"image file not found: {path}") from None
        except IsADirectoryError:
            raise fail(f"image path is a folder, not a file: {path}") from None
        except OSError as e:
            raise fail(f"cannot read image file {path}: {e.strerror or e}") from None
        except ImageReadError as e:
            raise fail(f"cannot read image file {path}: {e}") from None

    try:
        return unit_from_api(values, read, notes)
    except UnitError as e:
        if str(e).startswith(f"ControlNet unit {index}:"):
            raise
        raise fail(str(e)) from None


def _save_detected_maps(result, units, image_paths: list[Path], folder: Path) -> list[Path]:
    """``<folder>/<first image stem>-controlnet-<unit>.png`` for each map the result carries (the
    enabled units that keep their map, in order)."""
    indices = [i for i, u in enumerate(units) if u.enabled and u.save_detected_map]
    if image_paths:
        folder, stem = image_paths[0].parent, image_paths[0].stem
    else:
        stem = f"{result.seeds[0] if result.seeds else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for index, image in zip(indices, result.detected_maps):
        path = folder / f"{stem}-controlnet-{index}.png"
        image.save(path)
        saved.append(path)
    return saved


def cmd_generate(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from studio.core import Studio
    from studio.generation.request import RequestError, Txt2ImgRequest
    from studio.models.manager import ModelNotFoundError
    from studio.models.state_dict import ModelFileError

    notes: list[str] = []
    try:
        units = tuple(parse_controlnet_spec(spec, i, notes) for i, spec in enumerate(ns.controlnet))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if ns.save_detected_maps and not units:
        print("note: --save-detected-maps does nothing without --controlnet", file=sys.stderr)

    studio = Studio.create(_flags(ns))
    checkpoint = ns.checkpoint or studio.settings.get("sd_model_checkpoint")
    if checkpoint and not ns.checkpoint and studio.models.catalog.find(checkpoint) is None:
        checkpoint = None
    fields = dict(
        prompt=ns.prompt, negative_prompt=ns.negative_prompt, steps=ns.steps, cfg_scale=ns.cfg_scale,
        width=ns.width, height=ns.height, seed=ns.seed, batch_size=ns.batch_size, n_iter=ns.batch_count,
        sampler_name=ns.sampler, scheduler=ns.scheduler, clip_skip=ns.clip_skip, checkpoint=checkpoint,
        styles=tuple(ns.style), vae=ns.vae, subseed=ns.variation_seed, subseed_strength=ns.variation_strength,
        tiling=ns.tiling, save_images=ns.out is None, controlnet_units=units,
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
        studio.queue.shutdown()
        return 2
    studio.queue.shutdown()
    paths = result.paths
    if ns.out is not None:
        from studio.generation.outputs import save_image

        out = Path(ns.out)
        paths = [save_image(img, text, out, seed, dated=False)
                 for img, text, seed in zip(result.images, result.infotexts, result.seeds)]
    maps: list[Path] = []
    if ns.save_detected_maps and units:
        folder = Path(ns.out) if ns.out is not None else \
            studio.paths.outputs / ("img2img-images" if ns.init_image else "txt2img-images")
        maps = _save_detected_maps(result, units, list(paths), folder)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"model: {result.model.info.title} ({result.model.label})", file=sys.stderr)
    for p in [*paths, *maps]:
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
    if show("controlnet"):
        sections.append(("controlnet", [f"{c.api_name}\t{c.path}" for c in studio.controlnets.library.items()]))
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


def cmd_detect(ns: argparse.Namespace) -> int:
    from studio.controlnet.preprocessors import PreprocessorError
    from studio.core import Studio
    from studio.generation.outputs import ImageReadError, open_image
    from studio.generation.request import RequestError

    studio = Studio.create(_flags(ns))
    try:
        studio.preprocessors.get(ns.module)
    except PreprocessorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    names, images = [], []
    for name in ns.images:
        try:
            images.append(open_image(Path(name).read_bytes()))
            names.append(Path(name))
        except (OSError, ImageReadError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            status = 2
    if not images:
        return status
    try:
        maps = studio.detect(ns.module, images, ns.processor_res, ns.threshold_a, ns.threshold_b)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        studio.queue.shutdown()
    out = Path(ns.out) if ns.out is not None else studio.paths.outputs / "detected_maps"
    out.mkdir(parents=True, exist_ok=True)
    written: set[Path] = set()
    for name, image in zip(names, maps):
        target, n = out / f"{name.stem}-{ns.module}.png", 1
        while target in written:  # two inputs with the same file name
            target, n = out / f"{name.stem}-{ns.module}-{n}.png", n + 1
        image.save(target)
        written.add(target)
        print(target)
    return status


def _slider_text(slider) -> str:
    return f"{slider.label} {slider.minimum:g}-{slider.maximum:g} (default {slider.value:g})"


def cmd_preprocessors(ns: argparse.Namespace) -> int:
    from studio.core import Studio

    studio = Studio.create(_flags(ns))
    registry = studio.preprocessors
    for name in registry.names():
        p = registry.get(name)
        sliders = "; ".join(_slider_text(s) for s in (p.resolution, p.slider_1, p.slider_2) if s is not None)
        if p.needs_weights:
            missing = [f for f in p.needs_weights if not (registry.annotators_dir / f).is_file()]
            weights = f"needs {', '.join(p.needs_weights)} in {registry.annotators_dir} " + \
                (f"(missing: {', '.join(missing)})" if missing else "(found)")
        else:
            weights = "no weights needed"
        source = "" if p.source == "built-in" else f"\tfrom {p.source}"
        print(f"{name}\t{p.label}\t{sliders or 'no sliders'}\t{weights}{source}")
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
    commands = {"generate": cmd_generate, "models": cmd_models, "pnginfo": cmd_pnginfo, "upscale": cmd_upscale,
                "detect": cmd_detect, "preprocessors": cmd_preprocessors}
    return commands[ns.command](ns)


if __name__ == "__main__":
    raise SystemExit(main())
