"""A1111's ``emphasis`` option: "None", "Ignore", "Original" and "No norm", checked against the raw
text-encoder output of a tiny SD1 model (computed here without the prompt code)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from studio.errors import RequestError
from studio.prompts.encode import TextConditioner
from studio.prompts.parser import emphasis_pieces
from studio.prompts.schedule import ConditioningPlan
from studio.testing.factory import tiny_components


@pytest.fixture(scope="module")
def model():
    parts = tiny_components("sd1", seed=3)
    return SimpleNamespace(tokenizers=[parts["tokenizer"]], text_encoders=[parts["text_encoder"]], is_sdxl=False,
                           policy=SimpleNamespace(device=torch.device("cpu")))


@pytest.fixture()
def conditioner(model):
    return TextConditioner(model)


def raw(model, text: str) -> torch.Tensor:
    """The encoder's last hidden state for ``text`` in one 77-token chunk, no weighting at all."""
    tok = model.tokenizers[0]
    ids = tok(text, padding="max_length", max_length=77)["input_ids"]
    with torch.no_grad():
        return model.text_encoders[0](torch.tensor([ids])).last_hidden_state.float()


def token_position(model, text: str, word: str) -> int:
    """Index of ``word``'s (single) token in ``text``'s chunk, counting the BOS token."""
    tok = model.tokenizers[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    [word_id] = tok(word, add_special_tokens=False)["input_ids"]
    return 1 + ids.index(word_id)


def test_no_norm_is_the_raw_output_times_the_weights(model, conditioner):
    expected = raw(model, "a cat sitting")
    expected[0, token_position(model, "a cat sitting", "cat")] *= 1.5
    got = conditioner.encode("a (cat:1.5) sitting", 1, emphasis="No norm").embeds
    assert torch.allclose(got, expected, atol=1e-5)


def test_original_restores_the_mean_after_weighting(model, conditioner):
    plain = raw(model, "a cat sitting")
    scaled = plain.clone()
    scaled[0, token_position(model, "a cat sitting", "cat")] *= 1.5
    expected = scaled * (plain.mean() / scaled.mean())
    got = conditioner.encode("a (cat:1.5) sitting", 1).embeds  # "Original" is the default
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(conditioner.encode("a (cat:1.5) sitting", 1, emphasis="Original").embeds, got)
    # the modes do not share cache entries
    assert not torch.allclose(got, conditioner.encode("a (cat:1.5) sitting", 1, emphasis="No norm").embeds)


def test_ignore_equals_the_prompt_without_brackets(model, conditioner):
    ignored = conditioner.encode("a (cat:1.5) [sitting] (on a mat)", 1, emphasis="Ignore").embeds
    stripped = conditioner.encode("a cat sitting on a mat", 1).embeds
    assert torch.allclose(ignored, stripped, atol=1e-6)
    assert torch.allclose(ignored, raw(model, "a cat sitting on a mat"), atol=1e-5)
    weighted = conditioner.encode("a (cat:1.5) [sitting] (on a mat)", 1).embeds
    assert not torch.allclose(ignored, weighted, atol=1e-4)


def test_none_reads_brackets_weights_and_break_as_text(model, conditioner):
    text = "a (cat:1.5) BREAK [dog]"
    [chunk] = conditioner.chunks(text, "None")  # BREAK does not open a second chunk
    ids = model.tokenizers[0](text, add_special_tokens=False)["input_ids"]
    assert chunk.tokens[1:1 + len(ids)] == ids and set(chunk.weights) == {1.0}
    got = conditioner.encode(text, 1, emphasis="None").embeds
    assert torch.allclose(got, raw(model, text), atol=1e-5)
    assert len(conditioner.chunks(text)) == 2  # "Original" still breaks there


def test_emphasis_pieces_per_mode():
    text = "a (b:1.5) BREAK [c] (d BREAK e)"
    assert emphasis_pieces(text, "None") == [(text, 1.0)]
    original = emphasis_pieces(text, "Original")
    ignored = emphasis_pieces(text, "Ignore")
    assert [t for t, _ in ignored] == [t for t, _ in original]
    assert ("BREAK", -1.0) in original and ("BREAK", -1.0) in ignored
    # the BREAK inside brackets is a word (A1111 tests weight == -1); Ignore leaves it a word
    assert ("BREAK", -1.1) in original
    assert [w for t, w in ignored if t != "BREAK"] == [1.0] * (len(ignored) - 2)
    assert ignored.count(("BREAK", 1.0)) == 1
    assert emphasis_pieces(text, "No norm") == original
    with pytest.raises(RequestError, match="unknown emphasis mode 'Loud'"):
        emphasis_pieces(text, "Loud")


def test_plan_passes_the_mode_to_every_text(model, conditioner):
    plan = ConditioningPlan(conditioner, "a (cat:1.5) sitting AND [dog:bird:2]", "(ugly)", steps=4, clip_skip=1,
                            emphasis="No norm")
    embeds, _ = plan.at(0)
    expected = raw(model, "a cat sitting")
    expected[0, token_position(model, "a cat sitting", "cat")] *= 1.5
    assert torch.allclose(embeds[1:2], expected, atol=1e-5)
    negative = raw(model, "ugly")
    negative[0, token_position(model, "ugly", "ugly")] *= 1.1
    assert torch.allclose(embeds[0:1], negative, atol=1e-5)


@pytest.mark.parametrize("prompt,negative,mode,expected", [
    ("a (cat) sitting", "", "No norm", {"Emphasis": "No norm"}),
    ("a cat", "[ugly]", "Ignore", {"Emphasis": "Ignore"}),
    ("a (cat) sitting", "", "Original", {}),
    ("a cat sitting", "ugly", "None", {}),           # nothing to emphasise: A1111 writes nothing
    ("a [cat:dog:2] sitting", "", "None", {}),       # the editing brackets are gone once scheduled
])
def test_infotext_names_the_mode_like_a1111(conditioner, prompt, negative, mode, expected):
    plan = ConditioningPlan(conditioner, prompt, negative, steps=4, clip_skip=1, emphasis=mode)
    assert plan.infotext_params() == expected


def test_unknown_mode_is_a_request_error(conditioner):
    with pytest.raises(RequestError, match="expected one of None, Ignore, Original, No norm"):
        ConditioningPlan(conditioner, "a cat", "", steps=4, clip_skip=1, emphasis="original")
    with pytest.raises(RequestError):
        conditioner.encode("a cat", 1, emphasis="")
