"""Infotext: A1111's exact layout, and a parser that reads it back."""

import pytest

from studio.generation.infotext import build_infotext, infotext_to_fields, parse_infotext, quote


def test_layout_matches_a1111():
    text = build_infotext("a cat", "ugly", {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                                            "CFG scale": "7", "Seed": 1234567890, "Size": "512x512",
                                            "Model hash": "6ce0161689", "Model": "v1-5", "Clip skip": None})
    assert text == ("a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
                    "CFG scale: 7, Seed: 1234567890, Size: 512x512, Model hash: 6ce0161689, Model: v1-5")


def test_negative_line_omitted_when_empty():
    assert build_infotext("p", "", {"Steps": 1, "Seed": 2, "Size": "8x8"}) == "p\nSteps: 1, Seed: 2, Size: 8x8"


@pytest.mark.parametrize("value,expected", [("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'),
                                            ("x\ny", '"x\\ny"'), ('say "hi", ok', '"say \\"hi\\", ok"')])
def test_quote(value, expected):
    assert quote(value) == expected


@pytest.mark.parametrize("prompt,negative", [
    ("masterpiece, (cat:1.2), [dog:cat:0.5]", "blurry, lowres"),
    ("line one\nline two: with colon", "neg\nsecond"),
    ('quotes "inside", and commas', "ünïcödé 漢字 🙂"),
    ("日本語のプロンプト、猫", ""),
])
def test_round_trip(prompt, negative):
    params = {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "7.5",
              "Seed": 42, "Size": "640x512", "Model hash": "abcdef0123", "Model": "my, model: v2",
              "Hires prompt": 'a "quoted", prompt\nnext'}
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Steps"] == "20" and parsed["Seed"] == "42" and parsed["CFG scale"] == "7.5"
    assert parsed["Size-1"] == "640" and parsed["Size-2"] == "512"
    assert parsed["Model"] == "my, model: v2"
    assert parsed["Hires prompt"] == 'a "quoted", prompt\nnext'


def test_a1111_sample_text_and_defaults():
    text = ("((emphasis)), (emphasis1:1.1)\nNegative prompt: bad\nSteps: 30, Sampler: DPM++ 2M Karras, "
            "CFG scale: 6, Seed: 9, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
            'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    p = parse_infotext(text)
    assert p["Prompt"] == "((emphasis)), (emphasis1:1.1)"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["Clip skip"] == "1" and p["Schedule type"] == "Automatic"  # A1111 defaults
    fields = infotext_to_fields(p)
    assert fields["steps"] == 30 and fields["width"] == 512 and fields["height"] == 768
    assert fields["sampler_name"] == "DPM++ 2M Karras" and fields["cfg_scale"] == 6.0


def test_last_line_with_few_params_is_prompt():
    p = parse_infotext("just a prompt\nwith: one colon")
    assert p["Prompt"] == "just a prompt\nwith: one colon"
    assert "with" not in p


def test_garbage_never_raises():
    for text in ["", "\n\n", "Steps: x, Seed: y, Size: zz", 'a: "unterminated, b: 1, c: 2']:
        assert isinstance(parse_infotext(text), dict)
