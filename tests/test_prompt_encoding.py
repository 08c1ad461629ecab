"""Prompt encoding on tiny models through the real loader: chunks, weights, schedules,
AND, embeddings, styles, token counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.infotext import parse_infotext
from studio.generation.request import RequestError, Txt2ImgRequest
from studio.prompts.encode import tokenize_prompt
from studio.prompts.schedule import ConditioningPlan
from studio.prompts.styles import merge_style
from studio.testing.embeddings import (
    random_vectors,
    write_a1111_pt,
    write_diffusers,
    write_kohya_safetensors,
    write_sdxl_safetensors,
)
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    make_models_dir(root, (("sd1", ".safetensors"), ("sdxl", ".safetensors"), ("sd2", ".safetensors")))
    emb = root / "embeddings"
    emb.mkdir()
    write_a1111_pt(emb / "pt-style.pt", random_vectors(2, 32, seed=1))
    write_kohya_safetensors(emb / "kohyaemb.safetensors", random_vectors(1, 32, seed=2))
    write_diffusers(emb / "sub" / "diffemb.bin", "<diff>", random_vectors(3, 32, seed=3))
    write_sdxl_safetensors(emb / "xlemb.safetensors", random_vectors(2, 32, seed=4), random_vectors(2, 64, seed=5))
    write_kohya_safetensors(emb / "toowide.safetensors", random_vectors(1, 768, seed=6))
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nframed,"a photo of {prompt}, framed",blurry\n'
                                     'moody,"dark, moody",\n', encoding="utf-8")
    s = Studio.create(Flags(data_dir=str(root), no_half=True))
    yield s
    s.queue.shutdown()


def sd1(studio):
    return studio.select_checkpoint("tiny-sd1.safetensors")


def test_plain_prompt_matches_diffusers_encode_prompt(studio):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    m = sd1(studio)
    ours = m.conditioner.encode("a photo of a cat", 1).embeds
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                   unet=m.unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    theirs, _ = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)
    assert torch.allclose(ours, theirs, atol=1e-5)

    x = studio.select_checkpoint("tiny-sdxl.safetensors")
    cond = x.conditioner.encode("a photo of a cat", 1)
    pipe = StableDiffusionXLPipeline(vae=x.vae, text_encoder=x.text_encoders[0], text_encoder_2=x.text_encoders[1],
                                     tokenizer=x.tokenizers[0], tokenizer_2=x.tokenizers[1], unet=x.unet,
                                     scheduler=None)
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(cond.embeds, embeds, atol=1e-5)
    assert torch.allclose(cond.pooled, pooled, atol=1e-5)


def test_long_prompt_break_and_comma_backtrack(studio):
    tok = sd1(studio).tokenizers[0]
    chunks, count = tokenize_prompt(tok, " ".join(["tower"] * 100))
    assert len(chunks) == 2 and count == 100 and all(len(c.tokens) == 77 for c in chunks)
    chunks, _ = tokenize_prompt(tok, "a cat BREAK a dog")
    assert len(chunks) == 2 and chunks[1].tokens[1:3] == tok("a dog", add_special_tokens=False)["input_ids"]
    # a comma at token 70 and the limit hit at 75: the 4 tokens after the comma move on
    text = " ".join(["tower"] * 69) + ", " + " ".join(["house"] * 10)
    chunks, _ = tokenize_prompt(tok, text)
    comma = tok(",", add_special_tokens=False)["input_ids"][0]
    assert chunks[0].tokens[70] == comma and chunks[0].tokens[71] == tok.eos_token_id
    assert chunks[1].tokens[1:11] == tok(" ".join(["house"] * 10), add_special_tokens=False)["input_ids"]
    assert tokenize_prompt(tok, text, comma_backtrack=0)[0][0].tokens[71] != tok.eos_token_id


def test_weights_scale_tokens_and_keep_the_mean(studio):
    m = sd1(studio)
    plain = m.conditioner.encode("a red cube", 1).embeds
    weighted = m.conditioner.encode("a (red:1.5) cube", 1).embeds
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)


def test_padding_to_more_chunks_does_not_change_the_text_s_own_encoding(studio):
    m = sd1(studio)
    m.conditioner.clear_cache()
    padded = m.conditioner.encode("a lonely tower", 1, 2).embeds
    alone = m.conditioner.encode("a lonely tower", 1).embeds
    assert padded.shape[1] == 2 * 77 and alone.shape[1] == 77
    assert len(m.conditioner.chunks("a lonely tower")) == 1
    assert torch.allclose(padded[:, :77], alone)


def test_prompt_editing_switches_at_the_named_step(studio):
    m = sd1(studio)
    plan = ConditioningPlan(m.conditioner, "a [cat:dog:2] sitting", "", steps=4, clip_skip=1)
    cat = m.conditioner.encode("a cat sitting", 1, plan.chunks).embeds
    dog = m.conditioner.encode("a dog sitting", 1, plan.chunks).embeds
    for step, expected in [(0, cat), (1, cat), (2, cat), (3, dog)]:  # A1111: step <= 2 is "cat"
        assert torch.equal(plan.at(step)[0][1:], expected)
    # alternation: A1111 compares the 0-based step with 1-based ends, so steps 0 and 1 both
    # see "cat", then dog, cat
    alt = ConditioningPlan(m.conditioner, "[cat|dog]", "", steps=4, clip_skip=1)
    assert torch.equal(alt.at(0)[0], alt.at(1)[0])
    assert not torch.equal(alt.at(1)[0], alt.at(2)[0])
    assert torch.equal(alt.at(1)[0], alt.at(3)[0])


def test_and_subprompts_batch_with_weights(studio):
    m = sd1(studio)
    plan = ConditioningPlan(m.conditioner, "a cat :1.2 AND a dog :0.5", "ugly", steps=4, clip_skip=1)
    assert plan.weights == [1.2, 0.5]
    embeds, _ = plan.at(0)
    assert embeds.shape[0] == 3  # negative + two sub-prompts
    r = studio.txt2img(Txt2ImgRequest(prompt="a cat :1.2 AND a dog :0.5", steps=2, width=64, height=64,
                                      seed=1, save_images=False))
    assert r.images[0].size == (64, 64)


def test_schedule_changes_generation_and_cache_avoids_recompute(studio):
    m = sd1(studio)
    calls = []
    handle = m.text_encoders[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        req = Txt2ImgRequest(prompt="a castle on a hill", steps=2, width=64, height=64, seed=9, save_images=False)
        studio.txt2img(req)
        first = len(calls)
        studio.txt2img(req)
        assert len(calls) == first  # same prompt again: no encoder call at all
    finally:
        handle.remove()
    # the sampler loop feeds the UNet the text in force at each step
    seen = []
    hook = m.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        studio.txt2img(Txt2ImgRequest(prompt="[castle:ocean:2]", steps=4, width=64, height=64, seed=9,
                                      sampler_name="Euler", save_images=False))
    finally:
        hook.remove()
    castle = m.conditioner.encode("castle", 1).embeds[0]
    ocean = m.conditioner.encode("ocean", 1).embeds[0]
    assert len(seen) == 4
    for step, ctx in enumerate(seen):  # rows: [negative, positive]
        assert torch.allclose(ctx[1], castle if step <= 2 else ocean)


@pytest.mark.parametrize("name,n", [("pt-style", 2), ("kohyaemb", 1), ("diffemb", 3)])
def test_embedding_formats_replace_exactly_their_slots(studio, name, n):
    m = sd1(studio)
    studio.refresh_embeddings()
    emb = m.conditioner.embeddings[name]
    seen = []
    module = m.text_encoders[0].embeddings.token_embedding
    handle = module.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    try:
        m.conditioner._cache.clear()
        with_emb = m.conditioner.encode(f"a {name} cat", 1).embeds
    finally:
        handle.remove()
    tokens = m.conditioner.chunks(f"a {name} cat")[0].tokens
    assert tokens[2:2 + n] == [0] * n  # BOS, "a", then the placeholder slots
    token_embeds = seen[-1][0]
    assert torch.allclose(token_embeds[2:2 + n], emb.vectors["default"])
    a_id = tokens[1]
    assert torch.allclose(token_embeds[1], module.weight[a_id])
    # causal attention: nothing before the embedding changes; positions from it on do
    without = m.conditioner.encode("a zzzq cat", 1).embeds
    assert torch.allclose(with_emb[0, :2], without[0, :2], atol=1e-6)
    assert not torch.allclose(with_emb[0, 2], without[0, 2])


def test_sdxl_embedding_uses_both_parts_and_sd1_skips_it(studio):
    studio.select_checkpoint("tiny-sdxl.safetensors")
    api = studio.embeddings_api()
    assert "xlemb" in api["loaded"] and "pt-style" in api["skipped"]
    r = studio.txt2img(Txt2ImgRequest(prompt="xlemb castle", steps=2, width=64, height=64, seed=3,
                                      save_images=False))
    info = parse_infotext(r.infotexts[0])
    assert "xlemb: " in info["TI hashes"]
    sd1(studio)
    api = studio.embeddings_api()
    assert "xlemb" in api["skipped"] and "toowide" in api["skipped"]
    assert set(api["loaded"]) == {"pt-style", "kohyaemb", "diffemb"}
    assert set(api["loaded"]["pt-style"]) == {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}


def test_mismatched_embedding_in_prompt_is_plain_text(studio):
    sd1(studio)
    r = studio.txt2img(Txt2ImgRequest(prompt="toowide castle", steps=2, width=64, height=64, seed=3,
                                      save_images=False))
    assert "TI hashes" not in parse_infotext(r.infotexts[0])


def test_extra_network_tags_are_removed_and_reported(studio):
    sd1(studio)
    r = studio.txt2img(Txt2ImgRequest(prompt="castle <lora:detail:0.8>", steps=2, width=64, height=64, seed=3,
                                      save_images=False))
    plain = studio.txt2img(Txt2ImgRequest(prompt="castle", steps=2, width=64, height=64, seed=3,
                                          save_images=False))
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(plain.images[0]))
    assert "Networks not found: detail" in " ".join(r.notes)  # no such file in models/Lora
    assert parse_infotext(r.infotexts[0])["Prompt"] == "castle <lora:detail:0.8>"


def test_styles(studio):
    assert merge_style("a photo of {prompt}, framed", "cat") == "a photo of cat, framed"
    assert merge_style("dark, moody", "cat") == "cat, dark, moody"
    assert merge_style("dark", "") == "dark"
    sd1(studio)
    r = studio.txt2img(Txt2ImgRequest(prompt="cat", styles=("framed", "moody"), steps=2, width=64, height=64,
                                      seed=3, save_images=False))
    info = parse_infotext(r.infotexts[0])
    assert info["Prompt"] == "a photo of cat, framed, dark, moody" and info["Negative prompt"] == "blurry"
    with pytest.raises(RequestError, match="Unknown style.*Available: framed, moody"):
        studio.submit_txt2img(Txt2ImgRequest(prompt="x", styles=("nope",)))


def test_token_counter(studio):
    sd1(studio)
    assert studio.token_count("a photo of a cat") == (5, 75)
    assert studio.token_count(" ".join(["tower"] * 80)) == (80, 150)
    assert studio.token_count("[short:" + " ".join(["long"] * 90) + ":5]") == (90, 150)
    assert studio.token_count("cat <lora:x:1>") == (1, 75)
