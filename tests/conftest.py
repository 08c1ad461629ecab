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
    from tests.helpers import Server, make_models_dir

    from studio.testing.embeddings import random_vectors, write_a1111_pt

    root = tmp_path_factory.mktemp("served")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    write_a1111_pt(root / "embeddings" / "tinyemb.pt", random_vectors(2, 32, seed=1))
    (root / "styles.csv").write_text("name,prompt,negative_prompt\nframed,\"{prompt}, framed\",blurry\n",
                                     encoding="utf-8")
    srv = Server(root)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
