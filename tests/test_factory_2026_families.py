"""The tiny Chroma, Z-Image and FLUX.2 Klein files load through diffusers' and transformers' own
code, offline, give back exactly the weights they were made from, and the tiny components run
diffusers' pipelines.

diffusers 0.42's Chroma converter hard-codes the full model's width (``inner_dim = 3072``) to
split a single block's fused ``linear1``; the Chroma proofs run diffusers' own converter with that
constant set to the tiny width (``_at_width`` of the FLUX.1 tests), nothing else changed. The
Z-Image and FLUX.2 converters need no patch. diffusers 0.42 has no single-file loader for
``AutoencoderKLFlux2``: the FLUX.2 VAE proof uses the ``AutoencoderKL`` converter, which reads
the same encoder/decoder names.
"""

from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
    load_single_file_checkpoint,
)
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM, Qwen3Model, T5EncoderModel

from studio.models.bundled_tokenizers import qwen3_tokenizer, t5_tokenizer
from studio.testing.chroma import (
    CHROMA_WIDTH,
    make_chroma_t5xxl,
    make_chroma_transformer,
    tiny_chroma_components,
    write_chroma_configs,
)
from studio.testing.flux2 import (
    FLUX2_HEAD_DIM,
    FLUX2_HEADS,
    FLUX2_PACKED_CHANNELS,
    KLEIN_TEXT_LAYERS,
    flux2_transformer_to_bfl,
    make_flux2_transformer,
    make_flux2_vae,
    tiny_flux2_klein_components,
    write_flux2_klein_configs,
)
from studio.testing.zimage import (
    QWEN3_HIDDEN,
    QWEN3_VOCAB_SIZE,
    ZIMAGE_WIDTH,
    make_qwen3,
    make_zimage_transformer,
    tiny_zimage_components,
    write_zimage_configs,
)
from tests.test_factory_new_families import _assert_same_weights, _at_width

COMFY_PREFIX = "model.diffusion_model."
FLUX2_WIDTH = FLUX2_HEADS * FLUX2_HEAD_DIM


# --------------------------------------------------------------------------- helpers


def _keys(path):
    """name -> (dtype, shape) of each tensor in a safetensors file."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in load_file(str(path)).items()}


def _checkpoint_type(path):
    return infer_diffusers_model_type(load_single_file_checkpoint(str(path)))


def _load(model_class, path, configs):
    return model_class.from_single_file(str(path), config=str(configs), subfolder="transformer",
                                        local_files_only=True)


def _load_chroma_at_tiny_width(path, configs):
    entry = SINGLE_FILE_LOADABLE_CLASSES["ChromaTransformer2DModel"]
    tiny = _at_width(entry["checkpoint_mapping_fn"], CHROMA_WIDTH)
    with mock.patch.dict(entry, {"checkpoint_mapping_fn": tiny}):
        return _load(ChromaTransformer2DModel, path, configs)


def _pretrained_folder(tmp_path, configs, name, weights):
    """A transformers model folder: the ``config.json`` of ``configs/name`` and the file."""
    folder = tmp_path / f"{name}-model"
    folder.mkdir()
    (folder / "config.json").write_bytes((configs / name / "config.json").read_bytes())
    (folder / "model.safetensors").symlink_to(weights)
    return folder


def _assert_is_an_image(image, size=64):
    pixels = np.asarray(image, dtype=np.float32)
    assert image.size == (size, size) and pixels.shape == (size, size, 3)
    assert pixels.std() > 0  # not a blank or constant picture


@pytest.fixture(scope="module")
def chroma():
    return tiny_chroma_components(seed=0)


@pytest.fixture(scope="module")
def zimage():
    return tiny_zimage_components(seed=0)


@pytest.fixture(scope="module")
def klein():
    return tiny_flux2_klein_components(seed=0)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    return {
        "chroma": write_chroma_configs(root / "chroma"),
        "zimage": write_zimage_configs(root / "zimage"),
        "klein": write_flux2_klein_configs(root / "klein"),
    }


# --------------------------------------------------------------------------- Chroma


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_chroma_transformer_file_loads_exactly_with_diffusers(tmp_path, chroma, configs, prefix):
    path = make_chroma_transformer(tmp_path / "Chroma1-HD.safetensors", prefix=prefix, components=chroma)
    keys = {k.removeprefix(prefix): v for k, v in _keys(path).items()}
    assert all(k.startswith(prefix) for k in _keys(path))
    assert _checkpoint_type(path) == "chroma"
    # the approximator replaces every modulation and the time/vector/guidance embedders
    assert keys["distilled_guidance_layer.in_proj.weight"][1] == (64, 64)
    assert "distilled_guidance_layer.layers.1.out_layer.bias" in keys
    assert "distilled_guidance_layer.norms.1.scale" in keys
    pruned = ("img_mod.", "txt_mod.", ".modulation.", "adaLN_modulation", "time_in.", "vector_in.", "guidance_in.")
    assert not [k for k in keys if any(p in k for p in pruned)]
    # FLUX.1's blocks: q/k/v fused, and in single blocks the 4x MLP input too
    assert keys["double_blocks.0.img_attn.qkv.weight"][1] == (3 * CHROMA_WIDTH, CHROMA_WIDTH)
    assert keys["single_blocks.3.linear1.weight"][1] == (7 * CHROMA_WIDTH, CHROMA_WIDTH)
    assert {dtype for dtype, _ in keys.values()} == {torch.bfloat16}

    if not prefix:  # diffusers' converter as it ships splits linear1 at FLUX's full width
        with pytest.raises(RuntimeError, match="3072"):
            _load(ChromaTransformer2DModel, path, configs["chroma"])
    loaded = _load_chroma_at_tiny_width(path, configs["chroma"])
    _assert_same_weights(chroma["transformer"], loaded, torch.bfloat16)


def test_chroma_t5_file_loads_with_transformers(tmp_path, chroma, configs):
    path = make_chroma_t5xxl(tmp_path / "t5xxl_fp16.safetensors", components=chroma)
    keys = _keys(path)
    assert "shared.weight" in keys and "encoder.embed_tokens.weight" not in keys
    assert {dtype for dtype, _ in keys.values()} == {torch.float16}
    folder = _pretrained_folder(tmp_path, configs["chroma"], "text_encoder", path)
    loaded = T5EncoderModel.from_pretrained(str(folder), local_files_only=True)
    _assert_same_weights(chroma["text_encoder"], loaded, torch.float16)


# --------------------------------------------------------------------------- Z-Image


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_zimage_transformer_file_loads_exactly_with_diffusers(tmp_path, zimage, configs, prefix):
    path = make_zimage_transformer(tmp_path / "z_image_turbo_bf16.safetensors", prefix=prefix,
                                   components=zimage)
    keys = {k.removeprefix(prefix): v for k, v in _keys(path).items()}
    assert _checkpoint_type(path) == "z-image-turbo"
    # ComfyUI's NextDiT names: one patch embedder, fused q/k/v, attention.out
    assert keys["x_embedder.weight"][1] == (ZIMAGE_WIDTH, 16 * 2 * 2)
    assert keys["layers.1.attention.qkv.weight"][1] == (3 * ZIMAGE_WIDTH, ZIMAGE_WIDTH)
    assert "noise_refiner.0.attention.out.weight" in keys and "context_refiner.1.attention.k_norm.weight" in keys
    assert not [k for k in keys if k.startswith(("all_", "norm_final")) or ".to_" in k]
    # Z-Image's modulation is a bare linear (Lumina 2's is adaLN_modulation.1, after a SiLU);
    # the caption refiner has none
    assert "layers.0.adaLN_modulation.0.weight" in keys and "noise_refiner.1.adaLN_modulation.0.bias" in keys
    assert not [k for k in keys if k.startswith("context_refiner.") and "adaLN" in k]
    assert keys["cap_embedder.0.weight"][1] == (QWEN3_HIDDEN,)  # the text encoder's width
    assert keys["x_pad_token"][1] == keys["cap_pad_token"][1] == (1, ZIMAGE_WIDTH)

    loaded = _load(ZImageTransformer2DModel, path, configs["zimage"])
    _assert_same_weights(zimage["transformer"], loaded, torch.bfloat16)


def test_qwen3_file_is_comfyui_layout_and_loads_as_both_pipelines_encoders(tmp_path, zimage, configs):
    path = make_qwen3(tmp_path / "qwen_3_4b.safetensors", components=zimage)
    keys = _keys(path)
    assert all(k.startswith("model.") for k in keys) and "lm_head.weight" not in keys
    assert keys["model.embed_tokens.weight"][1] == (QWEN3_VOCAB_SIZE, QWEN3_HIDDEN)
    assert keys["model.layers.35.self_attn.q_norm.weight"][1] == (16,)  # per-head norm, 36 layers
    assert keys["model.layers.0.self_attn.k_proj.weight"][1] == (2 * 16, QWEN3_HIDDEN)  # 2 key/value heads
    assert {dtype for dtype, _ in keys.values()} == {torch.bfloat16}

    folder = _pretrained_folder(tmp_path, configs["zimage"], "text_encoder", path)
    text_model = Qwen3Model.from_pretrained(str(folder), local_files_only=True)  # Z-Image's
    _assert_same_weights(zimage["text_encoder"], text_model, torch.bfloat16)
    causal_lm = Qwen3ForCausalLM.from_pretrained(str(folder), local_files_only=True)  # Klein's
    _assert_same_weights(zimage["text_encoder"], causal_lm.model, torch.bfloat16)
    assert causal_lm.lm_head.weight.data_ptr() == causal_lm.model.embed_tokens.weight.data_ptr()

    ids = torch.tensor([[151644, 872, 198, 64, 8251, 151645]])
    with torch.no_grad():
        hidden = text_model(ids, output_hidden_states=True).hidden_states
        same = causal_lm(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 37  # the embeddings + 36 layers: Klein's layers 9, 18, 27 exist
    assert torch.equal(hidden[-2], same[-2])


# --------------------------------------------------------------------------- FLUX.2 Klein


def test_flux2_klein_transformer_file_loads_exactly_with_diffusers(tmp_path, klein, configs):
    path = make_flux2_transformer(tmp_path / "flux-2-klein-4b.safetensors", components=klein)
    keys = _keys(path)
    # diffusers has no Klein type: every FLUX.2 file is "flux-2-dev" to it, hence config=
    assert _checkpoint_type(path) == "flux-2-dev"
    for shared in ("double_stream_modulation_img", "double_stream_modulation_txt"):
        assert keys[f"{shared}.lin.weight"][1] == (2 * 3 * FLUX2_WIDTH, FLUX2_WIDTH)
    assert keys["single_stream_modulation.lin.weight"][1] == (3 * FLUX2_WIDTH, FLUX2_WIDTH)
    assert not [k for k in keys if k.endswith(".bias") or "_mod." in k or "guidance_in" in k]
    assert keys["img_in.weight"][1] == (FLUX2_WIDTH, FLUX2_PACKED_CHANNELS)
    assert keys["txt_in.weight"][1] == (FLUX2_WIDTH, len(KLEIN_TEXT_LAYERS) * QWEN3_HIDDEN)
    # SwiGLU (2 x 3 x width) in the double blocks; q, k, v and the SwiGLU input in linear1
    assert keys["double_blocks.1.img_mlp.0.weight"][1] == (6 * FLUX2_WIDTH, FLUX2_WIDTH)
    assert keys["single_blocks.0.linear1.weight"][1] == (9 * FLUX2_WIDTH, FLUX2_WIDTH)
    assert keys["double_blocks.0.txt_attn.norm.key_norm.scale"][1] == (FLUX2_HEAD_DIM,)

    loaded = _load(Flux2Transformer2DModel, path, configs["klein"])
    _assert_same_weights(klein["transformer"], loaded, torch.bfloat16)


def test_flux2_transformer_with_a_comfyui_prefix_is_not_loadable_by_diffusers(tmp_path, klein, configs):
    # diffusers recognises the prefixed names, but its FLUX.2 converter never strips the prefix
    path = make_flux2_transformer(tmp_path / "cut.safetensors", prefix=COMFY_PREFIX, components=klein)
    assert _checkpoint_type(path) == "flux-2-dev"
    with pytest.raises(KeyError):
        _load(Flux2Transformer2DModel, path, configs["klein"])


@pytest.mark.parametrize("nested", [True, False])
def test_flux2_vae_file_is_bfl_layout_and_converts_with_diffusers(tmp_path, klein, configs, nested):
    path = make_flux2_vae(tmp_path / "flux2-vae.safetensors", nested_quant_convs=nested, components=klein)
    keys = _keys(path)
    quant_convs = ("encoder.quant_conv.weight", "decoder.post_quant_conv.weight")
    assert all((k in keys) == nested for k in quant_convs)
    assert all((k in keys) != nested for k in ("quant_conv.weight", "post_quant_conv.weight"))
    assert keys["decoder.conv_in.weight"][1][1] == 32 and keys["encoder.conv_out.weight"][1][0] == 2 * 32
    assert keys["bn.running_mean"][1] == keys["bn.running_var"][1] == (FLUX2_PACKED_CHANNELS,)
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.up.3.upsample.conv.weight" in keys

    with pytest.raises(ValueError, match="only compatible with"):  # no AutoencoderKLFlux2 entry in 0.42
        AutoencoderKLFlux2.from_single_file(str(path), config=str(configs["klein"]), subfolder="vae",
                                            local_files_only=True)
    checkpoint = load_single_file_checkpoint(str(path))
    lifted = {k.removeprefix("encoder.").removeprefix("decoder.") if "quant_conv." in k else k: v
              for k, v in checkpoint.items()}
    vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(str(configs["klein"]), subfolder="vae"))
    state_dict = convert_ldm_vae_checkpoint(lifted, vae.config)
    state_dict |= {k: v for k, v in checkpoint.items() if k.startswith("bn.")}
    vae.load_state_dict(state_dict)  # strict: BatchNorm does without its step counter
    _assert_same_weights(klein["vae"], vae)


# --------------------------------------------------------------------------- pipelines

# The pipelines pad every prompt to max_sequence_length (512 by default); 64 keeps the 36-layer
# tiny Qwen3 quick on a CPU and changes nothing else.
MAX_TOKENS = 64
PROMPT = "a photo of a cat"


def _generate(pipe, **kwargs):
    return pipe(prompt=PROMPT, height=64, width=64, num_inference_steps=1, max_sequence_length=MAX_TOKENS,
                generator=torch.Generator().manual_seed(0), **kwargs).images[0]


@pytest.mark.slow  # the engines' equivalence tests run these pipelines in the quick suite
def test_chroma_pipeline_runs_on_the_tiny_components(chroma):
    tokenizer = t5_tokenizer()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                          tokenizer=tokenizer, **chroma)
    embeds, _, mask, *_ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                             max_sequence_length=MAX_TOKENS)
    # T5's last hidden state for the padded prompt; the transformer sees the prompt's tokens
    # (with </s>) and the first pad token only
    assert embeds.shape == (1, MAX_TOKENS, chroma["text_encoder"].config.d_model)
    assert int(mask.sum()) == len(tokenizer(PROMPT).input_ids) + 1
    _assert_is_an_image(_generate(pipe, guidance_scale=3.0))


@pytest.mark.slow  # the engines' equivalence tests run these pipelines in the quick suite
def test_zimage_pipeline_runs_on_the_tiny_components(zimage):
    tokenizer = qwen3_tokenizer()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=tokenizer, **zimage)
    embeds, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=MAX_TOKENS)
    # Qwen3's second-to-last hidden state, one (tokens, width) tensor per prompt: the
    # chat-templated prompt's tokens, padding dropped
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert len(embeds) == 1 and embeds[0].shape == (len(tokenizer(templated).input_ids), QWEN3_HIDDEN)
    _assert_is_an_image(_generate(pipe, guidance_scale=0.0))  # Turbo runs without CFG


@pytest.mark.slow  # the engines' equivalence tests run these pipelines in the quick suite
def test_flux2_klein_pipeline_runs_on_the_tiny_components(klein):
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                              tokenizer=qwen3_tokenizer(), is_distilled=True, **klein)
    embeds, text_ids = pipe.encode_prompt(PROMPT, max_sequence_length=MAX_TOKENS)
    # Qwen3's hidden states 9, 18 and 27 side by side, for every (padded) token
    assert embeds.shape == (1, MAX_TOKENS, len(KLEIN_TEXT_LAYERS) * QWEN3_HIDDEN)
    assert text_ids.shape == (1, MAX_TOKENS, 4)
    _assert_is_an_image(_generate(pipe))


# --------------------------------------------------------------------------- determinism and guards


@pytest.mark.parametrize(("make", "components"), [(make_chroma_transformer, tiny_chroma_components),
                                                  (make_zimage_transformer, tiny_zimage_components),
                                                  (make_flux2_transformer, tiny_flux2_klein_components)])
def test_transformer_files_are_a_function_of_the_seed(tmp_path, make, components):
    first = make(tmp_path / "a.safetensors", seed=5).read_bytes()
    again = make(tmp_path / "b.safetensors", components=components(seed=5)).read_bytes()
    other = make(tmp_path / "c.safetensors", seed=6).read_bytes()
    assert first == again != other


def test_flux2_renaming_refuses_unknown_and_incomplete_weights():
    with pytest.raises(KeyError, match="no original name"):
        flux2_transformer_to_bfl({"transformer_blocks.0.attn.to_q.bias": torch.zeros(2)})
    partial = {f"transformer_blocks.0.attn.add_{x}_proj.weight": torch.zeros(2, 2) for x in "qk"}
    with pytest.raises(KeyError, match="needs 3 fused parts"):
        flux2_transformer_to_bfl(partial)
