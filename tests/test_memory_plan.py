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
