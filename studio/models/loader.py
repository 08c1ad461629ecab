"""Loading a checkpoint file into diffusers/transformers modules, fully offline.

The file is read once; the family comes from :mod:`studio.models.probe`, the component
configs from :mod:`studio.models.arch`; each component then goes through diffusers'
single-file loaders (``from_single_file`` with a local ``config`` dir, and
``create_diffusers_clip_model_from_ldm`` for CLIP), so key conversion stays diffusers'.
Configs are written to a cache dir keyed by their content, because those loaders take a
folder, never a dict. Tokenizers come from :mod:`studio.models.tokenizer` (built from the
CLIP vocabulary shipped in open_clip), so nothing is ever fetched from a hub.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.devices import DevicePolicy
from studio.families.spec import FamilySpec, family_spec
from studio.models.arch import derive_configs
from studio.models.bundled import match_bundled
from studio.models.catalog import CheckpointInfo
from studio.models.config_dir import write_config_dir
from studio.models.probe import REFINER_TE, SD2_TE, CheckpointProbe, probe_checkpoint
from studio.models.state_dict import ModelFileError, load_state_dict
from studio.models.tokenizer import make_clip_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# diffusers warns about "modules that should be kept in float32: []" on every dtype cast
# of SD models, which have none; the empty list makes it pure noise in the user's console.
logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)

CONFIG_DIR = Path(__file__).parent / "configs"


@functools.lru_cache(maxsize=1)
def _shipped_scheduler_config() -> str:
    return (CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")


def scheduler_base_config(prediction_type: str) -> dict[str, Any]:
    config = json.loads(_shipped_scheduler_config())  # a fresh dict: callers may change it
    config["prediction_type"] = prediction_type
    return config


@dataclass
class LoadedModel:
    info: CheckpointInfo
    probe: CheckpointProbe
    unet: Any          # the denoiser: SD's UNet2DConditionModel, or SD3's / FLUX's transformer
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    prediction_type: str
    policy: DevicePolicy
    timings: dict[str, float] = field(default_factory=dict)
    # Two files with equal arch_key can swap weights into the same module objects.
    arch_key: tuple = ()
    conditioner: Any = None  # the model's TextConditioner (prompt encoding + cache)
    # per-model state made on first use: LoRA backups, the external-VAE swap
    lora_patcher: Any = None
    # the separate text-encoder / VAE files a DiT checkpoint was completed with: kind -> file name
    modules_used: dict[str, str] = field(default_factory=dict)
    previewer: Any = None   # latents -> live-preview image (generation/preview.py), made with the model
    memory_plan: str = ""   # how the manager placed it on the device (models/memory_plan.py), for the user
    latent_codec: Any = None  # the sampler's latents <-> the VAE's (generation/txt2img.ScaleShiftCodec)
    vae_swapper: Any = None

    def __post_init__(self) -> None:
        from studio.models.latent_codec import ScaleShiftCodec

        self.latent_codec = ScaleShiftCodec(self.vae)
        if self.spec.is_flow:
            from studio.families.dit_engine import dit_engine

            engine = dit_engine(self.spec.id)
            self.conditioner = engine.conditioner(self)
            self.latent_codec = engine.latent_codec(self) or self.latent_codec
        else:
            from studio.prompts.encode import TextConditioner

            self.conditioner = TextConditioner(self)
        from studio.generation.preview import LatentPreviewer

        self.previewer = LatentPreviewer(self)

    @property
    def spec(self) -> FamilySpec:
        """The family's declaration (studio/families/spec.py)."""
        return family_spec(self.probe.family)

    @property
    def denoiser(self) -> Any:
        """The network that denoises: SD's UNet or the DiT families' transformer (held in ``unet``)."""
        return self.unet

    @property
    def modules(self) -> list[Any]:
        return [self.unet, self.vae, *self.text_encoders]

    @functools.cached_property
    def nbytes(self) -> int:
        """Bytes of every parameter and buffer: what keeping this model cached costs."""
        return sum(t.numel() * t.element_size() for m in self.modules
                   for t in (*m.parameters(), *m.buffers()))

    def move_to(self, device: torch.device) -> None:
        for module in self.modules:
            if next(module.parameters()).device != device:
                module.to(device)

    @property
    def text_widths(self) -> dict[str, int]:
        """Text-encoder widths keyed as embedding files key them."""
        if self.spec.is_flow:
            return {}  # textual-inversion files are for the CLIP-only families
        widths = [te.config.hidden_size for te in self.text_encoders]
        if self.is_refiner:
            return {"clip_g": widths[0]}
        return {"clip_l": widths[0], "clip_g": widths[1]} if self.is_sdxl else {"default": widths[0]}

    @property
    def family(self) -> str:
        return self.probe.family

    @property
    def is_sdxl(self) -> bool:
        return self.probe.family.startswith("sdxl")

    @property
    def is_refiner(self) -> bool:
        """The SDXL refiner: OpenCLIP bigG alone, aesthetic-score conditioning (5 time ids)."""
        return self.probe.family == "sdxl-refiner"

    @property
    def scheduler_config(self) -> dict[str, Any]:
        config = scheduler_base_config(self.prediction_type)
        if self.probe.zero_terminal_snr:
            config["rescale_betas_zero_snr"] = True
        return config

    @property
    def label(self) -> str:
        kind = self.probe.label
        if self.prediction_type == "v_prediction" and "v-prediction" not in kind:
            kind += " (v-prediction)"
        return kind


class Timer:
    """A1111-style phase timings: "Model loaded in 1.2s (load weights from disk: 0.3s, ...)"."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def record(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        parts = ", ".join(f"{k}: {v:.2f}s" for k, v in self.phases.items())
        return f"{total:.2f}s ({parts})"


def detect_v_prediction(unet: Any) -> bool:
    """A1111's ``is_using_v_parameterization_for_sd2``: at t=999 an epsilon model predicts
    roughly its input, a v model roughly its negation."""
    import torch
    cfg = unet.config
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, dtype=dtype, device=device)
    ctx = torch.full((1, 77, cfg.cross_attention_dim), 0.5, dtype=dtype, device=device)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=device), encoder_hidden_states=ctx).sample
    # only the first 4 channels are noise channels for inpainting UNets
    return float((out[:, :4] - x[:, :4]).float().mean()) < -1


def _drop_unused_sd2_layer(sd: dict[str, torch.Tensor], te_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """SD2 uses OpenCLIP's penultimate layer: the last resblock has no HF counterpart."""
    last = te_config["num_hidden_layers"]
    prefix = f"{SD2_TE}transformer.resblocks.{last}."
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _place(policy: DevicePolicy, unet: Any, vae: Any, *text_encoders: Any) -> None:
    """Inference mode and memory layout. Moving to the device is the manager's job: with
    --medvram/--lowvram the weights stay in RAM and move piecewise while they run."""
    import torch
    for module in (unet, vae, *text_encoders):
        module.eval().requires_grad_(False)
    if policy.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    # diffusers picks SDPA by itself; only the other two choices need setting
    if policy.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
        vae.enable_xformers_memory_efficient_attention()
    elif policy.attention == "sliced":
        unet.set_attention_slice("auto")


@dataclass
class CheckpointFile:
    """A checkpoint read from disk and probed, before any module exists."""

    info: CheckpointInfo
    state_dict: dict[str, torch.Tensor]
    probe: CheckpointProbe
    configs: dict[str, dict[str, Any]]
    config_dir: Path
    timer: Timer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())

    def arch_key(self, policy: DevicePolicy) -> tuple:
        return (str(self.config_dir), self.probe.family, self.probe.variant, str(policy.dtype),
                str(policy.vae_dtype))


def read_checkpoint(info: CheckpointInfo, config_cache: Path) -> CheckpointFile:
    timer = Timer()
    sd = load_state_dict(info.path)
    timer.record("load weights from disk")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    probe = probe_checkpoint(shapes, info.name)
    if not probe.has_vae or not probe.has_text_encoder:
        missing = "VAE" if not probe.has_vae else "text encoder"
        raise ModelFileError(f"{info.name}: the checkpoint has no {missing} weights "
                             "(UNet-only files are not supported)")
    configs = derive_configs(shapes, probe)
    # Standard-size files use the shipped configs; any other size gets a derived config dir.
    config_dir = match_bundled(configs) or write_config_dir(configs, config_cache)
    if probe.family == "sd2":
        sd = _drop_unused_sd2_layer(sd, configs["text_encoder"])
    timer.record("derive config")
    return CheckpointFile(info, sd, probe, configs, config_dir, timer)


def load_checkpoint(info: CheckpointInfo, policy: DevicePolicy, config_cache: Path) -> LoadedModel:
    if info.is_diffusers:
        return load_diffusers_folder(info, policy)
    return build_model(read_checkpoint(info, config_cache), policy)


def build_model(ckpt: CheckpointFile, policy: DevicePolicy) -> LoadedModel:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    info, sd, probe, timer = ckpt.info, ckpt.state_dict, ckpt.probe, ckpt.timer
    dtype = policy.dtype
    common = {"config": str(ckpt.config_dir), "local_files_only": True}
    try:
        unet, vae = _empty_unet_and_vae(ckpt.config_dir, policy)
        timer.record("create model")
        _copy_weights(ckpt, _convert_unet_and_vae(sd, unet, vae))
        timer.record("load weights into model")
        text_encoders = []
        if "text_encoder" in ckpt.configs:
            text_encoders.append(create_diffusers_clip_model_from_ldm(
                CLIPTextModel, sd, subfolder="text_encoder", torch_dtype=dtype, **common))
        if "text_encoder_2" in ckpt.configs:
            text_encoders.append(create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, sd, subfolder="text_encoder_2", torch_dtype=dtype, **common))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{info.name}: weights do not fit the detected {probe.label} layout: {e}") from e
    finally:
        ckpt.state_dict = {}
        del sd
    timer.record("load text encoders")
    return _finish(ckpt, policy, unet, vae, text_encoders)


def _empty_unet_and_vae(config_dir: Path, policy: DevicePolicy) -> tuple[Any, Any]:
    """UNet and VAE with uninitialised storage already in the final dtype and memory layout,
    so the checkpoint's tensors are copied (and cast) into them in a single pass. diffusers'
    ``from_single_file`` casts each tensor, makes it contiguous, and channels_last then copies
    the convs again: measured on a full SD1.5 file, 3.4 s against 1.1 s for one pass. Neither
    module has buffers, which ``to_empty`` would leave uninitialised."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    modules = []
    for cls, sub, dtype in ((UNet2DConditionModel, "unet", policy.dtype),
                            (AutoencoderKL, "vae", policy.vae_dtype)):
        with init_empty_weights():
            module = cls.from_config(cls.load_config(config_dir, subfolder=sub, local_files_only=True))
        module.to(dtype=dtype)
        if policy.channels_last:
            module.to(memory_format=torch.channels_last)
        modules.append(module.to_empty(device="cpu"))
    return modules[0], modules[1]


def _convert_unet_and_vae(sd: dict[str, torch.Tensor], unet: Any, vae: Any) -> list[tuple[Any, dict]]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    return [(unet, convert_ldm_unet_checkpoint(sd, dict(unet.config))),
            (vae, convert_ldm_vae_checkpoint(sd, dict(vae.config)))]


def _copy_weights(ckpt: CheckpointFile, converted: list[tuple[Any, dict]]) -> None:
    """Copy converted weights into existing modules, after checking every parameter and
    buffer has a value (a partial copy would leave garbage or the previous model's weights)."""
    import torch
    for module, weights in converted:
        expected = {k for k, _ in (*module.named_parameters(), *module.named_buffers())}
        missing = expected - set(weights) - {k for k in expected if k.endswith("position_ids")}
        if missing:
            raise ModelFileError(f"{ckpt.info.name}: weights do not fit the {ckpt.probe.label} layout "
                                 f"(missing {sorted(missing)[:3]})")
    with torch.no_grad():
        for module, weights in converted:
            module.load_state_dict(weights, strict=False)


def reuse_model(old: LoadedModel, ckpt: CheckpointFile, policy: DevicePolicy) -> LoadedModel:
    """Load a checkpoint's weights into the module objects of ``old`` (same architecture),
    as A1111 does at ``sd_checkpoints_limit`` 1: no modules are built and no second copy of
    the model ever exists. Key conversion is diffusers' own (the converters
    ``from_single_file`` uses). ``old`` must not be used afterwards."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    sd, probe, timer = ckpt.state_dict, ckpt.probe, ckpt.timer
    te_prefix = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                 "sdxl-refiner": REFINER_TE}
    converted = _convert_unet_and_vae(sd, old.unet, old.vae)
    if probe.family in ("sd2", "sdxl-refiner"):
        converted.append((old.text_encoders[0], convert_open_clip_checkpoint(old.text_encoders[0], sd,
                                                                             te_prefix[probe.family])))
    else:
        converted.append((old.text_encoders[0], convert_ldm_clip_checkpoint(sd)))
    if len(old.text_encoders) == 2:
        converted.append((old.text_encoders[1], convert_open_clip_checkpoint(old.text_encoders[1], sd,
                                                                             te_prefix["sdxl"])))
    ckpt.state_dict = {}
    del sd
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level)
    for i, (module, weights) in enumerate(converted):
        if not hasattr(module, "text_model"):
            converted[i] = (module, {k.removeprefix("text_model."): v for k, v in weights.items()})
    _copy_weights(ckpt, converted)
    timer.record("load weights into existing model")
    return _finish(ckpt, policy, old.unet, old.vae, list(old.text_encoders))


def _finish(ckpt: CheckpointFile, policy: DevicePolicy, unet: Any, vae: Any, text_encoders: list[Any]) -> LoadedModel:
    info, probe, timer = ckpt.info, ckpt.probe, ckpt.timer
    prediction = probe.prediction_type or "epsilon"
    if probe.prediction_type is None:
        prediction = "v_prediction" if detect_v_prediction(unet) else "epsilon"
        timer.record("detect v-prediction")

    tokenizers = _tokenizers(probe.family, len(text_encoders))
    _place(policy, unet, vae, *text_encoders)
    timer.record("prepare modules")
    model = LoadedModel(info, probe, unet, vae, text_encoders, tokenizers, prediction, policy, timer.phases,
                        arch_key=ckpt.arch_key(policy))
    log.info("Model %s (%s) loaded in %s", info.title, model.label, timer.summary())
    return model


def _tokenizers(family: str, count: int) -> list[Any]:
    """One tokenizer per text encoder. OpenCLIP encoders (SD2, SDXL's bigG, the refiner's only
    encoder) pad with "!" (id 0), as A1111 pads them; OpenAI's CLIP-L pads with EOS."""
    if family == "sdxl-refiner":
        return [make_clip_tokenizer(pad_token="!")]
    tokenizers = [make_clip_tokenizer(pad_token="!" if family == "sd2" else "<|endoftext|>")]
    if count == 2:
        tokenizers.append(make_clip_tokenizer(pad_token="!"))
    return tokenizers


def load_diffusers_folder(info: CheckpointInfo, policy: DevicePolicy) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    timer = Timer()
    root = info.path
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        kw = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=policy.dtype, **kw)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=policy.vae_dtype, **kw)
        text_encoders = []
        # the refiner's folder has no text_encoder (model_index.json: [null, null])
        if (root / "text_encoder").is_dir() or not (root / "text_encoder_2").is_dir():
            text_encoders.append(CLIPTextModel.from_pretrained(root / "text_encoder", dtype=policy.dtype, **kw))
        if (root / "text_encoder_2").is_dir():
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(
                root / "text_encoder_2", dtype=policy.dtype, **kw))
        sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise ModelFileError(f"{info.name}: incomplete or corrupt diffusers folder: {e}") from e
    timer.record("load weights from disk")
    sdxl = "XL" in index.get("_class_name", "") or len(text_encoders) == 2
    family = "sdxl" if sdxl else ("sd2" if text_encoders[0].config.hidden_act == "gelu" else "sd1")
    if index.get("requires_aesthetics_score") or (sdxl and len(text_encoders) == 1):
        family = "sdxl-refiner"
    in_ch = unet.config.in_channels
    probe = CheckpointProbe(
        family=family, variant={9: "inpaint", 8: "ip2p"}.get(in_ch, "base"), in_channels=in_ch,
        prediction_type=sched.get("prediction_type", "epsilon"), has_vae=True, has_text_encoder=True,
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
    )
    tokenizers = _tokenizers(family, len(text_encoders))
    _place(policy, unet, vae, *text_encoders)
    timer.record("prepare modules")
    model = LoadedModel(info, probe, unet, vae, text_encoders, tokenizers, probe.prediction_type, policy,
                        timer.phases)
    log.info("Model %s (%s) loaded in %s", info.title, model.label, timer.summary())
    return model
