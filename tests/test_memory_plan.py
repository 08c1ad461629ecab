"""Placement without flags: the whole model on the GPU when it fits, model offload when its largest part
fits, block by block otherwise; flags and the GPU-weights setting win; the CPU never offloads."""

import math

from studio.models.memory_plan import INFERENCE_RESERVE_BYTES, plan_placement
from studio.offload import OffloadMode

GB = 1 << 30
FLUX_BF16 = {"denoiser": 23.8 * GB, "vae": 0.17 * GB, "text_encoder_0": 0.25 * GB, "text_encoder_1": 9.5 * GB}
SDXL_FP16 = {"denoiser": 5.1 * GB, "vae": 0.17 * GB, "text_encoder_0": 0.25 * GB, "text_encoder_1": 1.4 * GB}


def test_a_model_that_fits_stays_whole():
    plan = plan_placement(OffloadMode.NONE, "cuda", SDXL_FP16, free_bytes=23 * GB)
    assert plan.mode is OffloadMode.NONE and "fit" in plan.describe()


def test_flux_on_a_32_gb_card_offloads_by_component():
    # 33.7 GB of bf16 weights; the 23.8 GB transformer fits in 30 GB less the reserve, the whole does not
    plan = plan_placement(OffloadMode.NONE, "cuda", FLUX_BF16, free_bytes=30 * GB)
    assert plan.mode is OffloadMode.MEDVRAM and "the largest part (23.8 GB) does" in plan.describe()
    exact = plan_placement(OffloadMode.NONE, "cuda", FLUX_BF16, free_bytes=math.ceil(FLUX_BF16["denoiser"]) + INFERENCE_RESERVE_BYTES)
    assert exact.mode is OffloadMode.MEDVRAM


def test_flux_on_a_12_gb_card_goes_block_by_block():
    plan = plan_placement(OffloadMode.NONE, "cuda", FLUX_BF16, free_bytes=11 * GB)
    assert plan.mode is OffloadMode.LOWVRAM and "largest part (23.8 GB)" in plan.describe()


def test_flags_and_the_gpu_weights_setting_win():
    assert plan_placement(OffloadMode.LOWVRAM, "cuda", SDXL_FP16, 80 * GB).mode is OffloadMode.LOWVRAM
    # 80 GB free, but the user allows the weights 6 GB: SDXL's UNet fits alone, the whole model does not
    plan = plan_placement(OffloadMode.NONE, "cuda", SDXL_FP16, 80 * GB, gpu_weights_bytes=6 * GB)
    assert plan.mode is OffloadMode.MEDVRAM and "GPU weights setting" in plan.reason


def test_the_cpu_never_offloads():
    plan = plan_placement(OffloadMode.NONE, "cpu", FLUX_BF16, free_bytes=None)
    assert plan.mode is OffloadMode.NONE and "RAM" in plan.reason


def test_a_loaded_model_records_its_placement(tmp_path):
    from studio.config import Flags
    from studio.core import Studio
    from tests.helpers import make_models_dir

    make_models_dir(tmp_path)
    studio = Studio.create(Flags(data_dir=str(tmp_path), no_half=True))
    try:
        assert "CPU" in studio.engine.load(None).memory_plan
    finally:
        studio.queue.shutdown()


def test_a_16_bit_flux_that_only_fits_in_fp8_is_kept_in_fp8():
    from studio.models.memory_plan import plan_fp8_storage

    # 33.7 GB in bf16; 21.8 GB with the transformer in fp8: a 24 GB card takes it, a 48 GB card needs nothing
    assert plan_fp8_storage("cuda", FLUX_BF16, "denoiser", 16, free_bytes=24 * GB)
    assert not plan_fp8_storage("cuda", FLUX_BF16, "denoiser", 16, free_bytes=48 * GB)
    assert not plan_fp8_storage("cuda", FLUX_BF16, "denoiser", 16, free_bytes=12 * GB)   # offload instead
    assert not plan_fp8_storage("cuda", FLUX_BF16, "denoiser", 8, free_bytes=24 * GB)    # already fp8
    assert not plan_fp8_storage("cpu", FLUX_BF16, "denoiser", 16, free_bytes=None)


def test_fp8_storage_computes_from_the_stored_weights():
    import torch

    from studio.models.storage import storage_label, to_fp8_storage
    from studio.testing.flux import tiny_flux_components

    transformer = tiny_flux_components("dev", seed=1)["transformer"].to(torch.bfloat16)
    converted = to_fp8_storage(transformer, torch.float32)
    assert converted > 0 and storage_label(transformer) == "fp8_e4m3fn"
    linear = transformer.single_transformer_blocks[0].proj_mlp
    x = torch.randn(3, linear.in_features)
    assert torch.equal(linear(x), torch.nn.functional.linear(x, linear.weight.float(), linear.bias.float()))
    assert transformer.transformer_blocks[0].norm1.linear.bias.dtype == torch.float32  # the rest is compute dtype
