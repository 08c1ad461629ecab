"""The shipped configs are what the loader derives from real full-size key layouts."""

import pytest

from studio.models.arch import derive_configs
from studio.models.bundled import BUNDLED_DIR, bundled_configs, match_bundled
from studio.models.probe import probe_checkpoint
from studio.testing.fullsize import STANDARD, full_size_shapes


@pytest.fixture(scope="module", params=sorted(STANDARD))
def derived(request):
    shapes = full_size_shapes(STANDARD[request.param])
    probe = probe_checkpoint(shapes, request.param)
    return request.param, probe, derive_configs(shapes, probe)


def test_derived_from_full_size_shapes_matches_bundled(derived):
    name, probe, configs = derived
    assert configs == bundled_configs()[name]
    assert match_bundled(configs) == BUNDLED_DIR / name


def test_full_size_probe(derived):
    name, probe, _ = derived
    assert probe.family == STANDARD[name]["family"]
    assert probe.variant == ("inpaint" if "inpaint" in name else "base")
    assert probe.prediction_type == ("v_prediction" if name == "sd2-768-v" else
                                     None if probe.family == "sd2" else "epsilon")


def test_published_values():
    c = bundled_configs()
    assert c["sd15"]["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert c["sd15"]["unet"]["attention_head_dim"] == 8 and c["sd15"]["unet"]["cross_attention_dim"] == 768
    assert c["sd15"]["text_encoder"]["num_hidden_layers"] == 12
    assert c["sd2"]["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert c["sd2"]["text_encoder"]["num_hidden_layers"] == 23 and c["sd2"]["text_encoder"]["hidden_act"] == "gelu"
    assert c["sd2-768-v"]["unet"]["sample_size"] == 96
    xl = c["sdxl"]["unet"]
    assert xl["transformer_layers_per_block"] == [1, 2, 10] and xl["cross_attention_dim"] == 2048
    assert xl["addition_time_embed_dim"] == 256 and xl["projection_class_embeddings_input_dim"] == 2816
    assert c["sdxl"]["vae"]["scaling_factor"] == 0.13025 and c["sd15"]["vae"]["scaling_factor"] == 0.18215
    assert c["sdxl"]["text_encoder_2"]["num_hidden_layers"] == 32
    assert c["sdxl-inpaint"]["unet"]["in_channels"] == 9
