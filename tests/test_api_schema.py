"""Schemathesis over the running server's OpenAPI schema: whatever a client sends to /sdapi/v1 or
/controlnet, the answer is never a 5xx. Generation requests are kept cheap (small sizes, few steps)
only where they are valid; invalid values stay as generated, so validation is fuzzed too.

Marked slow (its own server and ~1,000 requests): CI runs it in its second step (``pytest -m slow``)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

EXAMPLES = 40  # per operation and mode

# Training runs for minutes, and creating embeddings / hypernetworks writes files named by the fuzzer:
# both have tests of their own (test_api_training.py).
EXCLUDED = r"/sdapi/v1/(train|create)/"
# Valid but costly values are capped to these (A1111's API defaults are 512x512, 50 steps).
CAPS = {"steps": 2, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "hr_scale": 1.0,
        "hr_second_pass_steps": 1, "hr_resize_x": 64, "hr_resize_y": 64, "seed_resize_from_w": 64,
        "seed_resize_from_h": 64}
VALID = {"steps": (1, 150), "width": (64, 2048), "height": (64, 2048), "batch_size": (1, 8), "n_iter": (1, 100),
         "hr_scale": (1, 4), "hr_second_pass_steps": (0, 150), "hr_resize_x": (64, 2048),
         "hr_resize_y": (64, 2048), "seed_resize_from_w": (64, 2048), "seed_resize_from_h": (64, 2048)}


@pytest.fixture(scope="module")
def schema_server(tmp_path_factory):
    from tests.helpers import make_models_dir, running_server

    root = tmp_path_factory.mktemp("schema")
    make_models_dir(root)
    with running_server(root) as srv:
        yield srv


def cheap(body: dict) -> None:
    """Cap the costly fields of a generation request where their values are valid, and fill the
    missing ones (whose defaults are costly)."""
    for key, cap in CAPS.items():
        value = body.get(key, cap)
        lo, hi = VALID[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
            body[key] = min(value, cap)


def operations(server) -> list:
    schema = (schemathesis.openapi.from_url(server.url + "/openapi.json")
              .include(path_regex=r"^/(sdapi/v1|controlnet)/")
              .exclude(path_regex=EXCLUDED))
    return [result.ok() for result in schema.get_all_operations()]


def test_no_server_errors(schema_server):
    ops = operations(schema_server)
    assert len(ops) >= 35, [op.label for op in ops]
    failures = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            def call(case):
                if case.path.endswith(("/txt2img", "/img2img")) and isinstance(case.body, dict):
                    cheap(case.body)
                case.call_and_validate(checks=[not_a_server_error], timeout=120)

            try:
                call()
            except Unsatisfiable:
                pass  # no invalid request exists (an operation without parameters)
            except BaseException as e:  # noqa: BLE001 - schemathesis raises exception groups
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                failures.append(f"{op.label} ({mode.value}): {e}")  # gather them all, then report
    assert not failures, "\n\n".join(failures)
