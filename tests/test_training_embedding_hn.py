"""Textual-inversion and hypernetwork training pieces on a tiny SD1 studio: creating the files,
training a few steps by hand, saving atomically, and using the results in a generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import Txt2ImgRequest
from studio.networks.embeddings import read_embedding
from studio.networks.hypernetworks import read_hypernetwork
from studio.testing.hypernetworks import tiny_widths
from studio.training.base import TrainingError
from studio.training.embedding import (
    EmbeddingTrainable,
    create_embedding,
    lr_at,
    parse_lr_schedule,
)
from studio.training.hypernetwork import HypernetworkTrainable, create_hypernetwork
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ti_hn")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors")))
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def sd1(studio):
    return studio.select_checkpoint("tiny-sd1.safetensors")


def token_rows(model, text: str, encoder: int = 0) -> torch.Tensor:
    ids = model.tokenizers[encoder](text, add_special_tokens=False)["input_ids"]
    table = token_table(model, encoder)
    return table[torch.tensor(ids)].detach().float()


def token_table(model, encoder: int = 0) -> torch.Tensor:
    te = model.text_encoders[encoder]
    return getattr(te, "text_model", te).embeddings.token_embedding.weight


def snapshot(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone()
            for i, m in enumerate(model.modules) for k, v in m.state_dict().items()}


def assert_same_weights(model, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


def grad_flags(model) -> list[bool]:
    return [p.requires_grad for m in model.modules for p in m.parameters()]


def unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 4, 8, 8, generator=g)


def train_steps(trainable, model, caption: str, steps: int = 5) -> list[float]:
    """A minimal optimisation: MSE between the UNet's prediction and a random target."""
    groups = trainable.attach(model)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    latents, timestep, target = unet_inputs()
    losses = []
    for _ in range(steps):
        context, _pooled = trainable.encode(model, [caption], 1)
        pred = model.unet(latents, timestep, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def generate(studio, prompt: str):
    req = Txt2ImgRequest(prompt=prompt, steps=2, width=64, height=64, seed=5, sampler_name="Euler",
                         save_images=False)
    result = studio.txt2img(req)
    return np.asarray(result.images[0]), parse_infotext(result.infotexts[0])


def unet_out(model, context: torch.Tensor) -> torch.Tensor:
    latents, timestep, _ = unet_inputs(1)
    with torch.no_grad():
        return model.unet(latents, timestep, encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def test_lr_schedule_strings():
    schedule = parse_lr_schedule("0.005:100, 1e-3:1000, 1e-5", 10000)
    assert schedule == [(0.005, 100), (1e-3, 1000), (1e-5, 10000)]
    assert lr_at(schedule, 1) == 0.005 and lr_at(schedule, 50) == 0.005 and lr_at(schedule, 100) == 0.005
    assert lr_at(schedule, 101) == 1e-3 and lr_at(schedule, 500) == 1e-3
    assert lr_at(schedule, 5000) == 1e-5 and lr_at(schedule, 20000) == 1e-5
    constant = parse_lr_schedule("0.01", 300)
    assert constant == [(0.01, 300)] and lr_at(constant, 1) == lr_at(constant, 300) == 0.01
    assert parse_lr_schedule(2e-4, 10) == [(2e-4, 10)]
    # cut at the run's length; -1 means "to the end"
    assert parse_lr_schedule("0.005:100, 1e-3:1000, 1e-5", 500) == [(0.005, 100), (1e-3, 500)]
    assert parse_lr_schedule("0.1:10, 0.01:-1", 50) == [(0.1, 10), (0.01, 50)]
    # an explicit last step ends the schedule there
    assert parse_lr_schedule("0.1:10, 0.01:20", 50)[-1] == (0.01, 20)


@pytest.mark.parametrize("text", ["abc", "", "0.1:x", "0.1, 0.01:100", "0.1:100, 0.01:50",
                                  "-0.1", "0", "nan", "0.1:0", "0.1:100,,0.01"])
def test_bad_lr_schedules(text):
    with pytest.raises(TrainingError):
        parse_lr_schedule(text, 1000)


# ---------------------------------------------------------------------------------------------
# Creating embeddings


def test_create_embedding_initialises_from_the_init_text(studio, tmp_path):
    m = sd1(studio)
    path = create_embedding(m, "initcat", "a cat", 2, folder=tmp_path)
    assert path == tmp_path / "initcat.pt"
    emb = read_embedding(path)
    assert emb.name == "initcat" and emb.vectors["default"].shape == (2, 32) and emb.step == 0
    assert torch.equal(emb.vectors["default"], token_rows(m, "a cat"))
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "initcat"
    assert list(raw["string_to_param"]) == ["*"]

    # more vectors than tokens repeat them in order; fewer pick them evenly
    four = read_embedding(create_embedding(m, "four", "a cat", 4, folder=tmp_path)).vectors["default"]
    a, cat = token_rows(m, "a cat")
    assert torch.equal(four, torch.stack([a, a, cat, cat]))
    one = read_embedding(create_embedding(m, "one", "a cat", 1, folder=tmp_path)).vectors["default"]
    assert torch.equal(one, a[None])
    star = read_embedding(create_embedding(m, "star", folder=tmp_path)).vectors["default"]
    assert torch.equal(star, token_table(m)[265][None])
    empty = read_embedding(create_embedding(m, "empty", "", 3, folder=tmp_path)).vectors["default"]
    assert torch.equal(empty, torch.zeros(3, 32))


def test_create_embedding_refuses_bad_input_and_overwrites_on_request(studio, tmp_path):
    m = sd1(studio)
    path = create_embedding(m, "dup", "a cat", 1, folder=tmp_path)
    with pytest.raises(TrainingError, match="already exists"):
        create_embedding(m, "dup", "a dog", 1, folder=tmp_path)
    assert torch.equal(read_embedding(path).vectors["default"], token_rows(m, "a"))
    create_embedding(m, "dup", "dog", 2, overwrite=True, folder=tmp_path)
    assert torch.equal(read_embedding(path).vectors["default"], token_rows(m, "dog").repeat(2, 1))
    for bad in ("", "a/b", "..", ".hidden", "x:y"):
        with pytest.raises(TrainingError):
            create_embedding(m, bad, folder=tmp_path)
    for count in (0, 76, -1):
        with pytest.raises(TrainingError, match="vectors per token"):
            create_embedding(m, "count", "a", count, folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.pt"]


def test_sdxl_embedding_create_train_and_save(studio, tmp_path):
    x = studio.select_checkpoint("tiny-sdxl.safetensors")
    path = create_embedding(x, "xlinit", "a cat", 2, folder=tmp_path)
    assert path.name == "xlinit.safetensors"
    emb = read_embedding(path)
    assert emb.widths == {"clip_l": 32, "clip_g": 64} and emb.n_vectors == 2
    assert torch.equal(emb.vectors["clip_l"], token_rows(x, "a cat", 0))
    assert torch.equal(emb.vectors["clip_g"], token_rows(x, "a cat", 1))

    trainable = EmbeddingTrainable(path, tmp_path / "xltrained.pt", lr=0.1)
    groups = trainable.attach(x)
    try:
        assert trainable.output_path.name == "xltrained.safetensors"
        context, pooled = trainable.encode(x, ["a photo of xltrained"], 1)
        assert pooled is not None and context.shape[-1] == 32 + 64
        (context.pow(2).mean() + pooled.pow(2).mean()).backward()
        params = groups[0]["params"]
        assert len(params) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        saved = trainable.save(trainable.output_path, 3, {})
    finally:
        trainable.detach(x)
    assert saved == tmp_path / "xltrained.safetensors"
    back = read_embedding(saved)
    assert back.widths == {"clip_l": 32, "clip_g": 64}
    assert torch.equal(back.vectors["clip_g"], emb.vectors["clip_g"])


# ---------------------------------------------------------------------------------------------
# Training an embedding


def test_embedding_training_end_to_end(studio):
    m = sd1(studio)
    folder = studio.paths.embedding_dirs[0]
    other = create_embedding(m, "otheremb", "a dog", 1, folder=folder)
    path = create_embedding(m, "trainemb", "a cat", 2, folder=folder)
    studio.refresh_embeddings()
    before_embeddings = m.conditioner.embeddings
    assert {"otheremb", "trainemb"} <= set(before_embeddings)
    before_weights, before_flags = snapshot(m), grad_flags(m)
    initial = read_embedding(path).vectors["default"]

    trainable = EmbeddingTrainable(path, path, lr=0.05)
    assert trainable.kind == "embedding" and trainable.name == "trainemb"
    try:
        losses = train_steps(trainable, m, "a photo of trainemb")
        (param,) = trainable.params.values()
        assert param.requires_grad and param.dtype == torch.float32
        assert not any(grad_flags(m))  # nothing else learns
        live = m.conditioner.embeddings
        assert live["trainemb"] is trainable.embedding and live["otheremb"] is before_embeddings["otheremb"]
        assert len(losses) == 5
        trained = param.detach().clone()
        assert not torch.allclose(trained, initial, atol=1e-3)  # the vectors learned
        assert_same_weights(m, before_weights)                  # and nothing else changed

        # a library refresh mid-training swaps the prompt encoder's embeddings; encode puts ours back
        m.conditioner.set_embeddings(dict(before_embeddings))
        trainable.encode(m, ["trainemb"], 1)
        assert m.conditioner.embeddings["trainemb"] is trainable.embedding

        # conditioning cached for sample images is not reused after the vectors changed
        sample = m.conditioner.encode("a photo of trainemb", 1).embeds.clone()
        trainable.encode(m, ["trainemb"], 1)
        with torch.no_grad():
            param.add_(0.5)
        assert not torch.allclose(m.conditioner.encode("a photo of trainemb", 1).embeds, sample)
        with torch.no_grad():
            param.copy_(trained)

        # resume state round-trips
        state = trainable.state_dict()
        with torch.no_grad():
            param.zero_()
        trainable.load_state_dict(state)
        assert torch.equal(param.detach(), trained)
        with pytest.raises(TrainingError):
            trainable.load_state_dict({"clip_l": trained})

        saved = trainable.save(path, 5, {"sd_checkpoint": "abc1234567", "sd_checkpoint_name": "tiny-sd1"})
    finally:
        trainable.detach(m)
    assert m.conditioner.embeddings is before_embeddings
    assert grad_flags(m) == before_flags
    assert_same_weights(m, before_weights)

    assert saved == path
    back = read_embedding(path)
    assert torch.equal(back.vectors["default"], trained)
    assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (5, "abc1234567", "tiny-sd1")
    assert torch.load(path, weights_only=True)["name"] == "trainemb"
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, other.name])

    # the trained file works by its name in a prompt
    studio.refresh_embeddings()
    with_emb, info = generate(studio, "a photo of trainemb")
    without, plain_info = generate(studio, "a photo of")
    assert not np.array_equal(with_emb, without)
    assert f"trainemb: {back.hash}" in info["TI hashes"]
    assert "TI hashes" not in plain_info


def test_embedding_trainable_refuses_a_mismatched_file(studio, tmp_path):
    from studio.testing.embeddings import random_vectors, write_a1111_pt

    m = sd1(studio)
    wide = write_a1111_pt(tmp_path / "wide.pt", random_vectors(1, 768))
    before = m.conditioner.embeddings
    with pytest.raises(TrainingError, match="cannot be trained"):
        EmbeddingTrainable(wide, wide, 0.005).attach(m)
    with pytest.raises(TrainingError, match="cannot read"):
        EmbeddingTrainable(tmp_path / "missing.pt", tmp_path / "x.pt", 0.005).attach(m)
    assert m.conditioner.embeddings is before and not any(grad_flags(m))


def test_failed_saves_leave_the_previous_file(studio, tmp_path, monkeypatch):
    m = sd1(studio)
    emb_path = create_embedding(m, "atomic", "a cat", 1, folder=tmp_path)
    hn_path = create_hypernetwork("atomichn", sizes=tiny_widths("sd1"), folder=tmp_path, seed=0)
    originals = {p: p.read_bytes() for p in (emb_path, hn_path)}
    trainables = [EmbeddingTrainable(emb_path, emb_path, 0.1), HypernetworkTrainable(hn_path, hn_path, 0.1)]
    for trainable in trainables:
        groups = trainable.attach(m)
        try:
            with torch.no_grad():  # make the trained weights differ from the file
                for param in groups[0]["params"]:
                    param.add_(1.0)

            def broken_save(obj, f, *args, **kwargs):
                with open(f, "wb") as handle:  # half a file, then the disk fills up
                    handle.write(b"PK\x03\x04 partial")
                raise OSError("disk full")

            with monkeypatch.context() as patch:
                patch.setattr(torch, "save", broken_save)
                with pytest.raises(OSError, match="disk full"):
                    trainable.save(trainable.output_path, 9, {})
        finally:
            trainable.detach(m)
    assert {p: p.read_bytes() for p in originals} == originals
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.pt", "atomichn.pt"]
    # and a save that works replaces the file
    trainables[1].attach(m)
    try:
        trainables[1].save(hn_path, 9, {})
    finally:
        trainables[1].detach(m)
    assert read_hypernetwork(hn_path).step == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.pt", "atomichn.pt"]


# ---------------------------------------------------------------------------------------------
# Creating hypernetworks


def test_create_hypernetwork_reads_back(tmp_path):
    path = create_hypernetwork("hnrelu", sizes=(64, 32), layer_structure="1, 2, 1", activation="relu",
                               add_layer_norm=True, use_dropout=True, dropout_structure="0, 0.1, 0",
                               folder=tmp_path, seed=0)
    assert path == tmp_path / "hnrelu.pt"
    hn = read_hypernetwork(path)
    assert hn.widths == [32, 64]
    assert hn.layer_structure == [1.0, 2.0, 1.0] and hn.activation_func == "relu" and hn.is_layer_norm
    assert hn.use_dropout and hn.dropout_structure == [0.0, 0.1, 0.0]
    assert hn.weight_initialization == "Normal" and hn.step == 0 and hn.internal_name == "hnrelu"
    assert hn.layers[32][0].linear[0].weight.shape == (64, 32)
    # the same seed gives the same weights; k and v start different
    again = read_hypernetwork(create_hypernetwork("again", sizes=(64, 32), layer_structure="1, 2, 1",
                                                  activation="relu", add_layer_norm=True, use_dropout=True,
                                                  dropout_structure="0, 0.1, 0", folder=tmp_path, seed=0))
    k, v = hn.layers[32]
    assert torch.equal(again.layers[32][0].linear[0].weight, k.linear[0].weight)
    assert not torch.equal(k.linear[0].weight, v.linear[0].weight)

    deep = read_hypernetwork(create_hypernetwork("deep", sizes=[768], layer_structure=[1, 1.5, 2, 1],
                                                 weight_init="KaimingNormal", folder=tmp_path))
    assert deep.widths == [768] and deep.layer_structure == [1.0, 1.5, 2.0, 1.0]
    assert deep.activation_func == "linear" and not deep.use_dropout and deep.dropout_structure == [0.0] * 4
    for scheme in ("XavierUniform", "XavierNormal", "KaimingUniform"):
        hn = read_hypernetwork(create_hypernetwork(f"w{scheme}", sizes=[32], weight_init=scheme,
                                                   folder=tmp_path))
        assert hn.weight_initialization == scheme and hn.layers[32][0].linear[0].weight.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_structure": "2, 1"}, "start and end with 1"),
    ({"layer_structure": "1, 2"}, "start and end with 1"),
    ({"layer_structure": "1"}, "at least two"),
    ({"layer_structure": "1, x, 1"}, "not a number"),
    ({"layer_structure": "1, -2, 1"}, "above 0"),
    ({"activation": "nosuchthing"}, "activation"),
    ({"weight_init": "Uniformish"}, "initialization"),
    ({"use_dropout": True, "dropout_structure": "0, 0.1"}, "needs 3 numbers"),
    ({"use_dropout": True, "dropout_structure": "0.1, 0.1, 0"}, "start and end with 0"),
    ({"use_dropout": True, "dropout_structure": "0, 1.5, 0"}, "below 1"),
    ({"sizes": []}, "at least one"),
    ({"sizes": ["abc"]}, "whole number"),
    ({"name": "a/b"}, "valid file name"),
])
def test_create_hypernetwork_refuses_bad_input(tmp_path, kwargs, message):
    args = {"name": "bad", "sizes": (32,), **kwargs}
    with pytest.raises(TrainingError, match=message):
        create_hypernetwork(**args, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_create_hypernetwork_overwrite(tmp_path):
    path = create_hypernetwork("same", sizes=(32,), folder=tmp_path, seed=1)
    with pytest.raises(TrainingError, match="already exists"):
        create_hypernetwork("same", sizes=(32,), activation="relu", folder=tmp_path)
    assert read_hypernetwork(path).activation_func == "linear"
    create_hypernetwork("same", sizes=(32,), activation="relu", overwrite=True, folder=tmp_path)
    assert read_hypernetwork(path).activation_func == "relu"


# ---------------------------------------------------------------------------------------------
# Training a hypernetwork


def _hook_count(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_hypernetwork_training_end_to_end(studio):
    m = sd1(studio)
    folder = studio.paths.hypernetwork_dirs[0]
    path = create_hypernetwork("trainhn", sizes=tiny_widths("sd1"), activation="relu", folder=folder, seed=0)
    context = m.conditioner.encode("a red cube", 1).embeds
    base = unet_out(m, context)
    before_weights, before_hooks = snapshot(m), _hook_count(m.unet)

    trainable = HypernetworkTrainable(path, path, lr=1e-2)
    assert trainable.kind == "hypernetwork"
    try:
        groups = trainable.attach(m)
        params = groups[0]["params"]
        assert groups[0]["lr"] == 1e-2 and params and all(p.requires_grad for p in params)
        own = {id(p) for _, module in trainable._modules() for p in module.parameters()}
        assert {id(p) for p in params} == own
        assert not any(grad_flags(m))
        assert _hook_count(m.unet) > before_hooks
        at_start = unet_out(m, context)
        trainable.detach(m)  # train_steps attaches again
        assert torch.equal(unet_out(m, context), base)

        train_steps(trainable, m, "a red cube")
        trained = unet_out(m, context)
        assert (trained - at_start).abs().max() > 1e-3  # the hooked modules are the ones that learned
        assert_same_weights(m, before_weights)

        state = trainable.state_dict()
        assert state and all(t.device.type == "cpu" for t in state.values())
        with torch.no_grad():
            for p in params:
                p.zero_()
        trainable.load_state_dict(state)
        assert torch.equal(unet_out(m, context), trained)
        with pytest.raises(TrainingError):
            trainable.load_state_dict({"nope": torch.zeros(1)})

        saved = trainable.save(path, 5, {"sd_checkpoint": "abc1234567", "sd_checkpoint_name": "tiny-sd1"})
    finally:
        trainable.detach(m)
    assert _hook_count(m.unet) == before_hooks
    assert torch.equal(unet_out(m, context), base)
    assert not any(grad_flags(m))

    hn = read_hypernetwork(saved)
    assert saved == path and hn.step == 5 and hn.sd_checkpoint == "abc1234567"
    assert hn.activation_func == "relu"
    assert hn.layer_structure == [1.0, 2.0, 1.0] and hn.widths == sorted(tiny_widths("sd1"))
    for width, (k, _v) in hn.layers.items():
        assert torch.equal(k.linear[0].weight, state[f"{width}.k.linear.0.weight"])
    assert sorted(p.name for p in folder.iterdir()) == ["trainhn.pt"]

    studio.networks.refresh()
    on, _ = generate(studio, "a red cube <hypernet:trainhn:1>")
    off, _ = generate(studio, "a red cube <hypernet:trainhn:0>")
    plain, _ = generate(studio, "a red cube")
    assert np.array_equal(off, plain)
    assert not np.array_equal(on, off)


def test_hypernetwork_dropout_only_while_training(studio, tmp_path):
    m = sd1(studio)
    path = create_hypernetwork("drop", sizes=tiny_widths("sd1"), layer_structure="1, 2, 2, 1",
                               activation="relu", use_dropout=True, dropout_structure="0, 0.5, 0.5, 0",
                               folder=tmp_path, seed=2)
    context = m.conditioner.encode("a red cube", 1).embeds
    trainable = HypernetworkTrainable(path, tmp_path / "dropout-out", lr=1e-3)
    assert trainable.output_path.name == "dropout-out.pt"
    trainable.attach(m)
    try:
        modules = [module for _, module in trainable._modules()]
        assert unet_out(m, context).equal(unet_out(m, context))  # no dropout without gradients
        assert not any(module.training for module in modules)
        latents, timestep, _ = unet_inputs()
        first = m.unet(latents, timestep, encoder_hidden_states=context).sample
        assert all(module.training for module in modules)
        second = m.unet(latents, timestep, encoder_hidden_states=context).sample
        assert not torch.equal(first, second)  # dropout fires while training
    finally:
        trainable.detach(m)
    assert not any(module.training for module in modules)


def test_hypernetwork_without_matching_widths_is_refused(studio, tmp_path):
    m = sd1(studio)
    path = create_hypernetwork("big", sizes=(768, 1280), folder=tmp_path, seed=0)
    hooks = _hook_count(m.unet)
    with pytest.raises(TrainingError, match="none of which"):
        HypernetworkTrainable(path, path, 1e-5).attach(m)
    assert _hook_count(m.unet) == hooks and not any(grad_flags(m))
