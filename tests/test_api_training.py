"""Training over the running app's API: A1111's create/train routes and our LoRA route."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.test_training_engine import make_images

TINY = {"steps": 3, "training_width": 64, "training_height": 64}


def dataset(server) -> Path:
    folder = Path(server.data_dir) / "trainset"
    if not folder.exists():
        make_images(folder, count=2, size=80)
    return folder


def post(server, path, body, timeout=300):
    return requests.post(server.url + "/sdapi/v1" + path, json=body, timeout=timeout)


def test_create_and_train_embedding_a1111_style(server):
    r = post(server, "/create/embedding", {"name": "apiemb", "num_vectors_per_token": 2, "init_text": "cat"})
    assert r.status_code == 200, r.text
    assert r.json()["info"].startswith("create embedding filename: ") and r.json()["info"].endswith("apiemb.pt")
    again = post(server, "/create/embedding", {"name": "apiemb"})
    assert again.status_code == 400 and "exists" in again.json()["detail"]
    body = {"embedding_name": "apiemb", "learn_rate": "0.005", "data_root": str(dataset(server)),
            "template_filename": "subject_filewords.txt", **TINY}
    r = post(server, "/train/embedding", body)
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert info.startswith("train embedding complete: filename: ") and "apiemb.pt" in info and info.endswith("None")
    assert r.json()["result"]["step"] == 3
    loaded = requests.get(server.url + "/sdapi/v1/embeddings", timeout=30).json()["loaded"]
    assert loaded["apiemb"]["step"] == 3


def test_create_and_train_hypernetwork(server):
    r = post(server, "/create/hypernetwork", {"name": "apihn", "enable_sizes": [32], "layer_structure": [1, 2, 1]})
    assert r.status_code == 200, r.text
    assert "apihn" in [h["name"] for h in requests.get(server.url + "/sdapi/v1/hypernetworks", timeout=30).json()]
    r = post(server, "/train/hypernetwork", {"hypernetwork_name": "apihn", "data_root": str(dataset(server)), **TINY})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["step"] == 3 and "apihn.pt" in r.json()["info"]


def test_train_lora_waits_or_queues(server):
    body = {"data_dir": str(dataset(server)), "output_name": "apilora", "steps": 3, "resolution": 64,
            "min_bucket_reso": 64, "max_bucket_reso": 128, "rank": 2, "alpha": 2, "mixed_precision": "no",
            "checkpoint": "tiny-sd1.safetensors"}
    r = post(server, "/train/lora", body)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["step"] == 3 and result["output"].endswith("apilora.safetensors")
    names = [lora["name"] for lora in requests.get(server.url + "/sdapi/v1/loras", timeout=30).json()]
    assert "apilora" in names
    # an existing name is refused before anything is queued
    r = post(server, "/train/lora", {**body, "resume": False})
    assert r.status_code == 400 and "already exists" in r.json()["detail"]
    # wait: false queues the run; progress shows it
    r = post(server, "/train/lora", {**body, "output_name": "apilora2", "steps": 40, "wait": False})
    assert r.status_code == 200 and r.json()["info"] == "queued"
    seen = False
    for _ in range(200):
        state = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()
        if "Training lora apilora2" in (state["textinfo"] or ""):
            seen = True
            break
        time.sleep(0.1)
    assert seen
    requests.post(server.url + "/sdapi/v1/interrupt", timeout=30)
    for _ in range(300):
        if requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0:
            break
        time.sleep(0.2)
    assert (Path(server.data_dir) / "models" / "Lora" / "apilora2.safetensors").is_file()


def test_bad_training_requests(server):
    r = post(server, "/train/lora", {"data_dir": "/nonexistent/folder", "output_name": "x"})
    assert r.status_code == 400 and "/nonexistent/folder" in r.json()["detail"]
    # a value out of the schema's range is a 422 with pydantic's words, as on the generation routes
    r = post(server, "/train/lora", {"data_dir": str(dataset(server)), "output_name": "x", "rank": 0})
    assert r.status_code == 422
    problems = [(e["loc"][-1], e["msg"]) for e in r.json()["detail"]]
    assert problems == [("rank", "Input should be greater than or equal to 1")]
    r = post(server, "/train/lora", {"train_data_dir": str(dataset(server)), "output_name": "x",
                                     "train_unet": False, "train_text_encoder": False})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"] == ("a LoRA must train the UNet, the text "
                                                                     "encoder, or both")
    r = post(server, "/train/lora", {"data_dir": str(dataset(server)), "output_name": "x", "bogus": 1})
    assert r.status_code == 422
    r = post(server, "/train/embedding", {"embedding_name": "nope", "data_root": str(dataset(server)), **TINY})
    assert r.status_code == 400 and "no embedding named 'nope'" in r.json()["detail"]
    r = post(server, "/create/hypernetwork", {"name": "badhn", "layer_structure": [2, 1]})
    assert r.status_code == 400
