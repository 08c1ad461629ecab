"""Step callbacks in the sampling loop (diffusers' callback_on_step_end with declared tensors) and
progress counted in sampler steps, not model calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import Flags
from studio.core import Studio
from studio.generation.request import Txt2ImgRequest
from studio.generation.runner import run_generation
from studio.generation.samplers import effective_schedule, split_sampler_name
from studio.generation.sampling import BatchSpec, ends_step, sample
from studio.generation.step_callbacks import TENSOR_INPUTS, OnStepEnd, StepCallback
from studio.prompts.schedule import ConditioningPlan
from tests.helpers import make_models_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stepcb")
    make_models_dir(root)
    studio = Studio.create(Flags(data_dir=str(root), no_half=True))
    model = studio.select_checkpoint("tiny-sd1.safetensors")
    yield studio, model
    studio.queue.shutdown()


def request(**changes) -> Txt2ImgRequest:
    base = {"prompt": "a red cube", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64,
            "seed": 11, "sampler_name": "Euler", "save_images": False}
    return Txt2ImgRequest(**{**base, **changes})


def prepared(studio, req):
    """The request as the engine hands it to the runner (settings resolved, names checked)."""
    return studio.engine.prepare(req).request


def generate(setup, req, **kw):
    studio, model = setup
    req = prepared(studio, req)
    return studio.queue.run(lambda state: (run_generation(model, req, state, **kw), state))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


class Recorder(StepCallback):
    tensor_inputs = ("latents", "noise_pred", "prompt_embeds")

    def __init__(self):
        self.steps, self.calls, self.seen = [], [], []

    def unet_kwargs(self, call):
        self.calls.append((call.index, call.step))
        return {}

    def on_step_end(self, step, tensors):
        self.steps.append((step.index, step.total))
        self.seen.append({name: tuple(t.shape) for name, t in tensors.items()})


def test_a_callback_sees_every_step_with_the_declared_tensors(setup):
    recorder = Recorder()
    latents_only = []
    fn = OnStepEnd(lambda index, timestep, tensors: latents_only.append((index, sorted(tensors))), ["latents"])
    generate(setup, request(steps=4, batch_size=2), callbacks=[recorder, fn])
    assert recorder.steps == [(i, 4) for i in range(4)]
    assert recorder.calls == [(i, i) for i in range(4)]
    # batch 2 with a negative prompt: the context holds the negative block and the prompt's block
    assert all(s["latents"] == (2, 4, 8, 8) and s["noise_pred"] == (2, 4, 8, 8) and s["prompt_embeds"][0] == 4
               for s in recorder.seen)
    assert latents_only == [(i, ["latents"]) for i in range(4)]


def test_second_order_samplers_end_each_step_once(setup):
    recorder = Recorder()
    generate(setup, request(steps=3, sampler_name="Heun"), callbacks=[recorder])
    assert [i for i, _ in recorder.steps] == [0, 1, 2]
    assert len(recorder.calls) == 5           # Heun: two calls per step, one for the last
    assert [step for _, step in recorder.calls] == [0, 0, 1, 1, 2]


def test_an_undeclared_tensor_is_refused(setup):
    with pytest.raises(ValueError, match="asks for latent.*offers latents"):
        OnStepEnd(lambda *a: None, ["latent"])

    class AsksTooMuch(StepCallback):
        tensor_inputs = ("latents", "pooled_embeds")

    calls = []
    _, model = setup
    handle = model.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="pooled_embeds"):
            generate(setup, request(), callbacks=[AsksTooMuch()])
    finally:
        handle.remove()
    assert calls == []                         # refused before the first UNet call

    class ReturnsUndeclared(StepCallback):
        tensor_inputs = ("noise_pred",)

        def on_step_end(self, step, tensors):
            return {"latents": tensors["noise_pred"]}

    with pytest.raises(ValueError, match="only return tensors it declared"):
        generate(setup, request(), callbacks=[ReturnsUndeclared()])

    class ReturnsNoisePred(StepCallback):
        tensor_inputs = ("noise_pred",)

        def on_step_end(self, step, tensors):
            return {"noise_pred": tensors["noise_pred"]}

    with pytest.raises(ValueError, match="only latents"):
        generate(setup, request(), callbacks=[ReturnsNoisePred()])


def test_a_callback_that_modifies_latents_changes_the_result(setup):
    plain, _ = generate(setup, request())
    same, _ = generate(setup, request(), callbacks=[OnStepEnd(lambda i, t, x: {"latents": x["latents"]})])
    assert np.array_equal(pixels(plain), pixels(same))

    def brighten(index, timestep, tensors):
        return {"latents": tensors["latents"] + 0.5} if index == 1 else None

    changed, _ = generate(setup, request(), callbacks=[OnStepEnd(brighten)])
    assert np.abs(pixels(plain) - pixels(changed)).max() > 0
    with pytest.raises(ValueError, match="shape"):
        generate(setup, request(), callbacks=[OnStepEnd(lambda i, t, x: {"latents": x["latents"][:, :2]})])


class InterruptsAt(StepCallback):
    """Presses Interrupt, as the UI's button does, at the end of step ``at``."""

    def __init__(self, state, at):
        self.state, self.at, self.seen = state, at, []

    def on_step_end(self, step, tensors):
        self.seen.append(step.index)
        if step.index == self.at:
            self.state.interrupted = True


def test_interrupt_still_stops_the_loop(setup):
    studio, model = setup
    req = prepared(studio, request(steps=6, n_iter=3))

    def job(state):
        watcher = InterruptsAt(state, at=1)
        return run_generation(model, req, state, callbacks=[watcher]), watcher.seen

    result, seen = studio.queue.run(job)
    assert result.interrupted and len(result.images) == 1   # the batch decodes what it had, no more batches
    assert seen == [0, 1]


def test_a_pass_ends_its_callbacks_even_on_an_error(setup):
    events = []

    class Tracks(StepCallback):
        def __init__(self, name):
            self.name = name

        def on_pass_start(self, run):
            events.append(("start", self.name, run.steps, tuple(run.seeds)))

        def on_pass_end(self, run):
            events.append(("end", self.name))

    class Fails(StepCallback):
        def unet_kwargs(self, call):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(setup, request(), callbacks=[Tracks("a"), Fails(), Tracks("b")])
    assert events == [("start", "a", 3, (11,)), ("start", "b", 3, (11,)), ("end", "b"), ("end", "a")]


def test_two_callbacks_may_not_set_the_same_unet_argument(setup):
    class Adds(StepCallback):
        def unet_kwargs(self, call):
            return {"mid_block_additional_residual": None}

    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        generate(setup, request(), callbacks=[Adds(), Adds()])


# --- progress: sampler steps, as diffusers counts them -----------------------------------------

class Progress(StepCallback):
    """Reads the job's counters at every step end (after the job's own progress callback)."""

    def __init__(self, state):
        self.state, self.seen = state, []

    def on_step_end(self, step, tensors):
        self.seen.append((self.state.step, self.state.total))


def progress_of(setup, req):
    studio, model = setup
    req = prepared(studio, req)

    def job(state):
        watcher = Progress(state)
        run_generation(model, req, state, callbacks=[watcher])
        return watcher.seen, (state.step, state.total)

    return studio.queue.run(job)


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "DPM2 a", "Euler"])
def test_progress_counts_requested_steps(setup, sampler):
    seen, final = progress_of(setup, request(steps=5, sampler_name=sampler))
    assert final == (5, 5)
    assert seen == [(i, 5) for i in range(1, 6)]


def test_progress_of_a_hires_pass_counts_its_own_steps(setup):
    req = request(steps=4, sampler_name="Heun", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                  hr_second_pass_steps=6, hr_denoising_strength=0.5)
    seen, final = progress_of(setup, req)
    # first pass 4 steps; the hires pass runs int(0.5 * 6) + 1 = 4 of its 6 steps
    assert seen == [(i, 4) for i in range(1, 5)] * 2 and final == (4, 4)


@pytest.mark.parametrize("name,calls,steps,order,ends", [
    ("euler", 3, 3, 1, [0, 1, 2]),
    ("heun", 5, 3, 2, [1, 3, 4]),
    ("plms warm-up", 4, 3, 1, [1, 2, 3]),
])
def test_ends_step_follows_diffusers(name, calls, steps, order, ends):
    assert [i for i in range(calls) if ends_step(i, calls, steps, order)] == ends


def spec_for(model, sampler_name, steps, **changes) -> BatchSpec:
    sampler, schedule = split_sampler_name(sampler_name, "Automatic")
    return BatchSpec(plan=ConditioningPlan(model.conditioner, "a house", "", steps, 1), sampler=sampler,
                     schedule=effective_schedule(sampler, schedule), steps=steps, cfg_scale=7.0, eta=None, width=64,
                     height=64, seeds=[5], **changes)


@pytest.mark.parametrize("sampler", ["Heun", "DPM2", "PLMS"])
def test_img2img_progress_counts_the_steps_it_runs(setup, sampler):
    studio, model = setup
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = spec_for(model, sampler, 6, init_latents=init, strength=0.5)   # int(0.5 * 6) + 1 = 4 steps

    def job(state):
        watcher = Progress(state)
        sample(model, BatchSpec(**{**spec.__dict__, "callbacks": [watcher]}), state)
        return watcher.seen

    assert studio.queue.run(job) == [(i, 4) for i in range(1, 5)]


def test_previews_come_every_n_steps_but_not_after_the_last(setup):
    studio, model = setup
    spec = spec_for(model, "Heun", 4, preview_every=2)

    def job(state):
        lat = sample(model, spec, state)
        return lat, state.step, state.total, state.preview_id, state.preview

    lat, step, total, previews, preview = studio.queue.run(job)
    assert (step, total) == (4, 4) and lat.shape == (1, 4, 8, 8)
    assert previews == 1 and preview.size == (64, 64)
    assert set(TENSOR_INPUTS) == {"latents", "noise_pred", "prompt_embeds"}


def test_added_cond_kwargs_of_callbacks_are_merged_and_clashes_refused():
    from studio.generation.step_callbacks import ModelCall, StepCallback, StepCallbacks

    class Adds(StepCallback):
        def __init__(self, **added):
            self.added = added
            self.seen = None

        def unet_kwargs(self, call):
            self.seen = dict(call.added)
            return {"added_cond_kwargs": dict(self.added)}

    call = ModelCall(0, 0, 4, None, 1.0, None, None, {"time_ids": 0}, 1, 1, False)
    first, second = Adds(image_embeds=1), Adds(extra=2)
    merged = StepCallbacks([first, second]).unet_kwargs(call)
    assert merged == {"added_cond_kwargs": {"image_embeds": 1, "extra": 2}}
    # a later callback sees what the earlier ones add (the reference pass needs an IP-Adapter's embeddings)
    assert first.seen == {"time_ids": 0} and second.seen == {"time_ids": 0, "image_embeds": 1}
    with pytest.raises(ValueError, match="image_embeds"):
        StepCallbacks([Adds(image_embeds=1), Adds(image_embeds=2)]).unet_kwargs(call)


def test_unet_output_replacements_chain_and_keep_their_shape():
    from studio.generation.step_callbacks import StepCallback, StepCallbacks

    class Doubles(StepCallback):
        def unet_output(self, call, pred):
            return pred * 2

    class Breaks(StepCallback):
        def unet_output(self, call, pred):
            return pred[:1]

    pred = torch.ones(2, 4, 2, 2)
    assert torch.equal(StepCallbacks([Doubles(), Doubles()]).unet_output(None, pred), pred * 4)
    with pytest.raises(ValueError, match="shape"):
        StepCallbacks([Breaks()]).unet_output(None, pred)
