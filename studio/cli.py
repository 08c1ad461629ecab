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
    python -m studio dataset ~/data/cat --resolution 512
    python -m studio train lora --data ~/data/cat --name cat_lora --steps 1500 --rank 16 --alpha 8 \
        --lr 1e-4 --train-text-encoder --sample-every 250 --sample-prompt "a photo of a cat"
    python -m studio create-embedding cat_style --init-text "painting" --vectors 4
    python -m studio train embedding --name cat_style --data ~/data/cat --lr "0.005:100, 1e-3:1000, 1e-5"
    python -m studio create-hypernetwork cat_hn --sizes 768,320,640,1280 --layer-structure "1, 2, 1"
    python -m studio train hypernetwork --name cat_hn --data ~/data/cat --lr 0.00001 --template style_filewords
    python -m studio serve [app.py flags]

Training prints its progress on stderr and the file it wrote on stdout; Ctrl-C stops it and saves what
was learned (exit status 130).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from studio.cli_schema import add_request_arguments, request_values
from studio.config import Flags, force_offline, parse_flags
from studio.generation.request import RequestSchemas


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
    p.add_argument("--text-encoder-dir", default=None,
                   help="extra folder of text encoders (clip_l, clip_g, t5xxl) for SD3/FLUX files that lack them")


def build_parser(schemas: RequestSchemas | None = None) -> argparse.ArgumentParser:
    schemas = schemas or RequestSchemas()
    parser = argparse.ArgumentParser(prog="studio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="txt2img, or img2img/inpainting with --init-image, to a folder")
    _common(g)
    # every request field is a flag, derived from the schema (studio.cli_schema)
    add_request_arguments(g, schemas.img2img)
    g.add_argument("--checkpoint", "-m", default=None, help="title, name or hash; default: last used")
    g.add_argument("--vae", default=None,
                   help="VAE file name, 'Automatic' or 'None' (the checkpoint's own); default: the sd_vae setting")
    g.add_argument("--modules", action="append", default=None, metavar="FILE",
                   help="a VAE / text-encoder file for SD3/FLUX checkpoints that lack them (repeat for each; "
                        "Forge's forge_additional_modules; default: the setting, or the only file of each kind)")
    g.add_argument("--out", "-o", default=None, help="output folder (default: the outdir_*_samples setting)")
    g.add_argument("--hr-denoising-strength", type=float, default=None,
                   help="the hires pass's denoising strength in txt2img (the API's denoising_strength there)")
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

    fast = g.add_argument_group("opt-in fast modes")
    fast.add_argument("--compile", action="store_true",
                      help="torch.compile the UNet's transformer blocks (the first run at a size compiles, "
                           "minutes on a CPU; cached on disk for later runs)")

    u = sub.add_parser("upscale", help="upscale images with an upscaler (Extras)")
    _common(u)
    u.add_argument("images", nargs="+")
    add_request_arguments(u, schemas.extras)   # every Extras field, from the schema
    u.add_argument("--out", "-o", default=None, help="output folder (default: the outdir_extras_samples setting)")

    from studio.merge import MergeRequest

    mg = sub.add_parser("merge", help="merge checkpoints (A1111's Checkpoint Merger) into a new .safetensors")
    _common(mg)
    add_request_arguments(mg, MergeRequest)   # every merger field, from its schema

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
                   choices=["all", "checkpoints", "modules", "vae", "lora", "hypernetworks", "embeddings",
                            "controlnet"])

    i = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    i.add_argument("image")

    _add_training_parsers(sub, schemas)

    sub.add_parser("serve", help="start the web UI and API (same flags as app.py)", add_help=False)
    return parser


# -------------------------------------------------------------------------------------------------------
# Training: train lora / embedding / hypernetwork, create-embedding, create-hypernetwork, dataset

def _dataset_flags(p: argparse.ArgumentParser) -> None:
    """``dataset``'s flags: the dataset fields of the training settings, with their help and defaults."""
    from studio.training.base import TrainSettings

    fields = TrainSettings.model_fields

    def described(name: str) -> str:
        return f"{fields[name].description} (default {fields[name].default})"

    p.add_argument("--resolution", type=int, default=fields["resolution"].default,
                   help=described("resolution"))
    p.add_argument("--no-bucket", action="store_true", help="no aspect-ratio buckets: crop every image square")
    p.add_argument("--min-bucket", type=int, default=fields["min_bucket_reso"].default,
                   help=described("min_bucket_reso"))
    p.add_argument("--max-bucket", type=int, default=fields["max_bucket_reso"].default,
                   help=described("max_bucket_reso"))
    p.add_argument("--caption-extension", default=fields["caption_extension"].default,
                   help=described("caption_extension"))


def _train_flags(p: argparse.ArgumentParser, schema) -> None:
    """A flag for every field of the kind's training schema (studio.training.schemas), named as the
    field, with the studio's older short names (``--data``, ``--name``, ``--lr``, ``--grad-accum``...)."""
    _common(p)
    add_request_arguments(p, schema)


def _add_training_parsers(sub, schemas=None) -> None:
    """``train lora|embedding|hypernetwork`` (flags from the studio's training schemas: ``schemas`` is a
    RequestSchemas with a ``training`` member or a TrainingSchemas), create-embedding,
    create-hypernetwork and dataset."""
    from studio.training.schemas import training_schemas

    training = training_schemas(schemas)
    t = sub.add_parser("train", help="train a LoRA, an embedding or a hypernetwork on a folder of images")
    kinds = t.add_subparsers(dest="kind", required=True)

    lo = kinds.add_parser("lora", help="train a LoRA (kohya format, into models/Lora)")
    _train_flags(lo, training.lora)
    lo.add_argument("--text-encoder-only", action="store_true",
                    help="train only the text encoder(s): --no-train-unet --train-text-encoder")
    for kind in ("embedding", "hypernetwork"):
        k = kinds.add_parser(kind, help=f"train an existing {kind} (make one with create-{kind})")
        _train_flags(k, training.of(kind))

    ce = sub.add_parser("create-embedding", help="create an embedding to train (A1111's Create embedding)")
    _common(ce)
    ce.add_argument("name")
    ce.add_argument("--init-text", default="*", help='start from these words\' token vectors (default "*")')
    ce.add_argument("--vectors", type=int, default=1, help="vectors per token, 1-75 (default 1)")
    ce.add_argument("--overwrite", action="store_true")

    ch = sub.add_parser("create-hypernetwork", help="create a hypernetwork to train (A1111's Create hypernetwork)")
    _common(ch)
    ch.add_argument("name")
    ch.add_argument("--sizes", default="768,320,640,1280", help="module sizes (default 768,320,640,1280)")
    ch.add_argument("--layer-structure", default="1, 2, 1")
    ch.add_argument("--activation", default="linear", help="linear, relu, leakyrelu, elu, swish, tanh, sigmoid")
    ch.add_argument("--weight-init", default="Normal",
                    help="Normal, XavierUniform, XavierNormal, KaimingUniform or KaimingNormal")
    ch.add_argument("--layer-norm", action="store_true", help="add layer normalization")
    ch.add_argument("--dropout", action="store_true", help="use dropout")
    ch.add_argument("--dropout-structure", default="0, 0, 0")
    ch.add_argument("--overwrite", action="store_true")

    ds = sub.add_parser("dataset", help="check a training folder: buckets and captions of every image")
    ds.add_argument("dir")
    _dataset_flags(ds)
    ds.add_argument("--limit", type=int, default=0, help="list at most this many images; 0 = all")


def _flags(ns: argparse.Namespace) -> Flags:
    return Flags(data_dir=ns.data_dir, models_dir=ns.models_dir, ckpt_dir=ns.ckpt_dir, device=ns.device,
                 no_half=ns.no_half, no_demo=ns.no_demo, vae_dir=ns.vae_dir, lora_dir=ns.lora_dir,
                 hypernetwork_dir=ns.hypernetwork_dir, controlnet_dir=ns.controlnet_dir,
                 text_encoder_dir=ns.text_encoder_dir)


# The unit fields a --controlnet SPEC may set (sd-webui-controlnet's names), and the old names the API
# also takes.
UNIT_KEYS = ("model", "module", "image", "mask", "weight", "resize_mode", "processor_res", "threshold_a",
             "threshold_b", "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option",
             "low_vram", "enabled", "save_detected_map", "union_control_type", "effective_region_mask",
             "advanced_weighting")
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
    from studio.generation.request import RequestError, build_request
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
    if ns.compile:
        studio.settings.update({"sd_compile_unet": True}, persist=False)
    try:
        img2img = bool(getattr(ns, "init_images", None))
        model = studio.schemas.img2img if img2img else studio.schemas.txt2img
        values = {**request_values(ns, model), "checkpoint": checkpoint, "vae": ns.vae,
                  "save_images": ns.out is None}
        if units:
            values["controlnet_units"] = units
        if ns.hr_denoising_strength is not None:
            values["hr_denoising_strength"] = ns.hr_denoising_strength
        if ns.modules:
            values["override_settings"] = {**(values.get("override_settings") or {}),
                                           "forge_additional_modules": list(ns.modules)}
        job = studio.engine.submit(build_request(model, values))
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
            studio.paths.outputs / ("img2img-images" if getattr(ns, "init_images", None) else "txt2img-images")
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
    studio.queue.shutdown()   # listing needs no worker

    def show(kind: str) -> bool:
        return ns.kind in ("all", kind)

    sections = []
    if show("checkpoints"):
        sections.append(("checkpoints", [f"{c.title}\t{c.path}" + ("\t(demo)" if c.is_demo else "")
                                         for c in studio.checkpoints()]))
    if show("modules"):  # text encoders and VAEs for SD3/FLUX checkpoints that lack them
        sections.append(("modules", [f"{m.name}\t{m.kind}\t{m.storage}\t{m.path}"
                                     for m in studio.engine.models.modules()]))
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
    from studio.generation.request import RequestError, build_request

    studio = Studio.create(_flags(ns))
    status = 0
    try:
        req = build_request(studio.schemas.extras, request_values(ns, studio.schemas.extras))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        studio.queue.shutdown()
        return 2
    for name in ns.images:
        try:
            image = open_image(Path(name).read_bytes())
            out, info, path = studio.engine.extras(req, image, save=ns.out is None)
        except (OSError, ImageReadError, RequestError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            status = 2
            continue
        if ns.out is not None:
            path = save_image(out, info, Path(ns.out), 0, dated=False)
        print(path)
    studio.queue.shutdown()
    return status


def cmd_merge(ns: argparse.Namespace) -> int:
    from studio.core import Studio
    from studio.generation.request import RequestError, build_request
    from studio.merge import MergeRequest

    studio = Studio.create(_flags(ns))
    try:
        result = studio.merge_checkpoints(build_request(MergeRequest, request_values(ns, MergeRequest)))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        studio.queue.shutdown()
    print(result.message)
    for note in result.notes:
        print(f"note: {note}")
    return 0


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


def _user_errors() -> tuple[type[BaseException], ...]:
    from studio.generation.request import RequestError
    from studio.models.manager import ModelNotFoundError
    from studio.models.state_dict import ModelFileError

    return (RequestError, ModelFileError, ModelNotFoundError)


def _template(value: str) -> str:
    """``--template``: a built-in template's name or a text file of template lines."""
    from studio.training.base import TrainingError
    from studio.training.dataset import DEFAULT_TEMPLATES

    if value in DEFAULT_TEMPLATES:
        return "\n".join(DEFAULT_TEMPLATES[value])
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TrainingError(f"cannot read the template file {path}: {e}") from None
        if not text.strip():
            raise TrainingError(f"the template file {path} is empty")
        return text
    raise TrainingError(f"unknown template {value!r}: use one of {', '.join(DEFAULT_TEMPLATES)} or a text file")


def training_request(ns: argparse.Namespace, schemas=None):
    """The TrainingRequest a ``train`` command line asks for: the flags given, over the schema's defaults,
    validated by the kind's schema (a RequestError with pydantic's words, as the API's 422 says)."""
    from studio.generation.request import build_request
    from studio.training.base import TrainingError
    from studio.training.runner import request_for
    from studio.training.schemas import training_schemas

    schema = training_schemas(schemas).of(ns.kind)
    values = request_values(ns, schema)
    if "train_data_dir" in values:
        values["train_data_dir"] = str(Path(values["train_data_dir"]).expanduser())
    if getattr(ns, "text_encoder_only", False):
        values.update(train_unet=False, train_text_encoder=True)
    if "learn_rate" in values and not str(values["learn_rate"]).strip():
        raise TrainingError("give a learning rate (--lr)")
    template = values.get("template", schema.model_fields["template"].default)
    if template:
        values["template"] = _template(template)
    return request_for(ns.kind, build_request(schema, values))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _progress_line(state, label: str) -> str:
    if not state.total:
        return f"{label}: {state.textinfo or 'waiting'}"
    loss = f", loss {state.losses[-1][1]:.4f}" if state.losses else ""
    return f"{label}: step {state.step}/{state.total}{loss}, ETA {_duration(state.eta)}"


def _wait_training(studio, job, label: str) -> tuple[object, bool]:
    """Wait for a training job, showing one line of progress on stderr. The first Ctrl-C interrupts it
    (it saves what it has learned) and goes on waiting; a second one stops waiting. Returns
    ``(result or None, interrupted by the user)``; a failed job raises its error."""
    import time

    tty = sys.stderr.isatty()
    shown, shown_at, interrupted = "", 0.0, False
    while True:
        try:
            while not job.done.wait(0.2):
                line = _progress_line(job.state, label)
                now = time.monotonic()
                if line != shown and (tty or now - shown_at >= 5 or not shown):
                    sys.stderr.write(f"\r{line:<79}" if tty else f"{line}\n")
                    sys.stderr.flush()
                    shown, shown_at = line, now
            break
        except KeyboardInterrupt:
            if interrupted:
                print("\nstopped waiting; the job did not finish saving", file=sys.stderr)
                return None, True
            interrupted = True
            if studio.queue.current is job.state:
                studio.queue.interrupt()
            else:  # still queued: it stops before its first step
                job.state.interrupted = True
            print("\ninterrupting: saving what was learned (Ctrl-C again to stop waiting)", file=sys.stderr)
    line = _progress_line(job.state, label)   # where it ended
    if line != shown:
        sys.stderr.write(f"\r{line:<79}" if tty else f"{line}\n")
        shown = line
    if tty and shown:
        sys.stderr.write("\n")
    sys.stderr.flush()
    return job.wait(), interrupted


def cmd_train(ns: argparse.Namespace) -> int:
    from studio.core import Studio

    errors = _user_errors()
    try:
        req = training_request(ns)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    studio = Studio.create(_flags(ns))
    try:
        job = studio.submit_training(req)
        result, interrupted = _wait_training(studio, job, f"train {ns.kind} {req.settings.output_name}")
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        studio.queue.shutdown()
    if result is None:
        return 130
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.saved:
        print(result.output_path)
    else:
        print("nothing was saved: no step was trained", file=sys.stderr)
    losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    print(f"step {result.step}{resumed}{losses}, {result.seconds:.1f}s")
    return 130 if interrupted else 0


def _print_from_studio(ns: argparse.Namespace, action) -> int:
    """Run ``action(studio)`` and print what it returns; a user error is printed as ``error:`` (exit 2)."""
    from studio.core import Studio

    studio = Studio.create(_flags(ns))
    try:
        print(action(studio))
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        studio.queue.shutdown()
    return 0


def cmd_create_embedding(ns: argparse.Namespace) -> int:
    return _print_from_studio(ns, lambda studio: studio.create_embedding(ns.name, ns.init_text, ns.vectors,
                                                                         overwrite=ns.overwrite))


def cmd_create_hypernetwork(ns: argparse.Namespace) -> int:
    return _print_from_studio(ns, lambda studio: studio.create_hypernetwork(
        ns.name, sizes=[part.strip() for part in ns.sizes.split(",") if part.strip()],
        layer_structure=ns.layer_structure, activation=ns.activation, weight_init=ns.weight_init,
        add_layer_norm=ns.layer_norm, use_dropout=ns.dropout, dropout_structure=ns.dropout_structure,
        overwrite=ns.overwrite))


def cmd_dataset(ns: argparse.Namespace) -> int:
    from studio.generation.request import RequestError, build_request
    from studio.training.base import TrainSettings
    from studio.training.dataset import TrainDataset, summary

    try:
        dataset = TrainDataset.from_settings(build_request(TrainSettings, {
            "train_data_dir": str(Path(ns.dir).expanduser()), "output_name": "dataset",
            "resolution": ns.resolution, "enable_bucket": not ns.no_bucket, "min_bucket_reso": ns.min_bucket,
            "max_bucket_reso": ns.max_bucket, "caption_extension": ns.caption_extension}))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(dataset))
    limit = ns.limit if ns.limit > 0 else len(dataset.items)
    for row in dataset.preview(limit):
        source = "" if row["caption_source"] == "file" else "  [caption from the file name]"
        print(f"{row['path']}\t{row['size']} -> {row['bucket']}\tx{row['repeats']}\t{row['caption']}{source}")
    if limit < len(dataset.items):
        print(f"... and {len(dataset.items) - limit} more", file=sys.stderr)
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
                "detect": cmd_detect, "preprocessors": cmd_preprocessors, "train": cmd_train,
                "create-embedding": cmd_create_embedding, "create-hypernetwork": cmd_create_hypernetwork,
                "dataset": cmd_dataset, "merge": cmd_merge}
    return commands[ns.command](ns)


if __name__ == "__main__":
    raise SystemExit(main())
