import os

# Any accidental hub call must fail at once instead of hanging (no network here).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


@pytest.fixture(scope="session")
def artifacts_dir():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One studio server (UI + API) for the API and browser tests."""
    from studio.testing import make_vae, tiny_components
    from studio.testing.controlnets import make_controlnet
    from studio.testing.embeddings import random_vectors, write_a1111_pt
    from studio.testing.hypernetworks import tiny_widths, write_hypernetwork
    from studio.testing.loras import write_kohya_lora
    from tests.helpers import make_models_dir, running_server

    root = tmp_path_factory.mktemp("served")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    sd1 = tiny_components("sd1", seed=1)
    write_kohya_lora(root / "models" / "Lora" / "tinylora.safetensors", sd1, "sd1", seed=2, output_name="tinyAlias")
    write_hypernetwork(root / "models" / "hypernetworks" / "tinyhn.pt", widths=tiny_widths("sd1"), seed=3)
    make_vae(root / "models" / "VAE" / "tinyvae.safetensors", "sd1", seed=4)
    write_a1111_pt(root / "embeddings" / "tinyemb.pt", random_vectors(2, 32, seed=1))
    make_controlnet(root / "models" / "ControlNet" / "tinycn.safetensors", "sd1", seed=5, components=sd1)
    # a user's extension that adds a preprocessor, and a broken one that must not stop start-up
    (root / "extensions" / "edges_plus").mkdir(parents=True)
    (root / "extensions" / "edges_plus" / "extension.py").write_text(
        "from PIL import ImageFilter, ImageOps\n"
        "def register(api):\n"
        "    api.add_preprocessor('edges_plus', lambda image, res, strength, _b, **ctx: "
        "ImageOps.autocontrast(image.filter(ImageFilter.FIND_EDGES)),\n"
        "                         label='Edges plus', slider_1=api.slider('Strength', 1, 10, 4))\n",
        encoding="utf-8")
    (root / "extensions" / "broken_ext").mkdir()
    (root / "extensions" / "broken_ext" / "extension.py").write_text(
        "raise RuntimeError('this extension is broken on purpose')\n", encoding="utf-8")
    (root / "styles.csv").write_text("name,prompt,negative_prompt\nframed,\"{prompt}, framed\",blurry\n",
                                     encoding="utf-8")
    # the tiny model's modules were only needed to write the files: a session fixture's frame lives until
    # the end of the run, and a test that counts the models alive in this process must not see them
    del sd1
    with running_server(root) as srv:
        yield srv
