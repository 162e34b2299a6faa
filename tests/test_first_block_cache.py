"""First Block Cache (`threshold` > 0) against a reference written directly on the eager model.

`ReferenceCache` is ParaAttention's First Block Cache written with forward hooks on the eager model:
block 0's hooks capture its input and outputs and decide; on a hit, the last block's hook replaces the
region's output with (block 0's outputs) + (the residuals cached at the slot's last miss), so the model's
own code after the loop computes exactly head(block-0 output + cached residual). The blocks between still
run in the reference (their result is thrown away): the reference is about values, not speed.

The compiled model runs the same calls; each call's hit or miss is read from `paracompile.cache_stats()`
and both the decisions and the outputs must match the reference. World size 1 runs in this process; world
size 2 runs every model in one `run_on_ranks` call (spawning ranks and importing diffusers costs seconds).
Thresholds are chosen by running the reference first: 0 (off), tiny (every call misses), huge (every call
that may hit does), and a middle one placed far (in ratio) from every diff of the sequence, so that rounding
differences between the compiled and the eager model cannot flip a decision.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn

import paracompile
import paracompile.backend as backend
from paracompile.options import parse_options
from tests.conftest import TOLERANCE, assert_matches, max_error
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

HUGE = 1e9
TINY = 1e-12
SCALAR_CPP = {"cpp.vec_isa_ok": False}


# ----------------------------------------------------------------------------------------------
# The reference


class _Slot:
    def __init__(self, taylor_order: int):
        self.r_prev = None
        self.calls = 0
        self.hits_in_row = 0
        self.taylor = None  # per stream, a TaylorSeer


class TaylorSeer:
    """TaylorSeer's published rule as cache-dit writes it (calibrators/taylorseer.py): every call advances
    the step; a computed step updates the derivatives dY_current from the previous computed step's
    (dY_prev) over the steps between them; a cached step predicts sum d^iY * elapsed^i / i!. One difference
    from cache-dit: the first derivative is taken at the second computed step (cache-dit waits for step 2)."""

    def __init__(self, order: int):
        self.order = order
        self.current_step = -1
        self.last_computed_step = -1
        self.dY_current = [None] * (order + 1)

    def mark_step_begin(self):
        self.current_step += 1

    def update(self, Y):
        dY_prev, window = self.dY_current, self.current_step - self.last_computed_step
        self.dY_current = [Y] + [None] * self.order
        for i in range(self.order):
            if dY_prev[i] is None:
                break
            self.dY_current[i + 1] = (self.dY_current[i] - dY_prev[i]) / window
        self.last_computed_step = self.current_step

    def approximate(self):
        elapsed = self.current_step - self.last_computed_step
        output = 0
        for i, derivative in enumerate(self.dY_current):
            if derivative is None:
                break
            output = output + derivative * (elapsed ** i / math.factorial(i))
        return output


class ReferenceCache:
    """First Block Cache by hand on an eager model. `blocks` lists every block of the cached loop(s) in
    order; `hidden_input(args, kwargs)` picks block 0's input on the hidden stream; block outputs are a
    tensor or a tuple of streams, and `hidden_index` says which one is the hidden stream. DBCache's
    generalisation: the first `front` blocks always run and their residual decides, the last `back` blocks
    always run after the cached ones; `taylor_order` > 0 predicts the cached residual with TaylorSeer."""

    def __init__(self, model: nn.Module, blocks: list, hidden_input: Callable, hidden_index: int,
                 threshold: float, warmup: int = 0, max_hits: Optional[int] = None, front: int = 1, back: int = 0,
                 taylor_order: int = 0):
        self.model, self.hidden_input, self.hidden_index = model, hidden_input, hidden_index
        self.threshold, self.warmup, self.max_hits = threshold, warmup, max_hits
        self.taylor_order = taylor_order
        self.slots: dict = {}
        self.handles = [
            blocks[0].register_forward_pre_hook(self._before_first, with_kwargs=True),
            blocks[front - 1].register_forward_hook(self._after_first),
            blocks[len(blocks) - back - 1].register_forward_hook(self._after_last),
        ]

    def close(self):
        for handle in self.handles:
            handle.remove()

    def __call__(self, inputs: dict, slot: Any, new_generation: bool = False):
        """Returns (output, hit, diff or None)."""
        if new_generation:
            self.slots.clear()
        self.slot = self.slots.setdefault(slot, _Slot(self.taylor_order))
        with torch.no_grad():
            output = self.model(**inputs)
        return output, self.hit, self.diff

    def _before_first(self, module, args, kwargs):
        self.block_input = self.hidden_input(args, kwargs)

    def _after_first(self, module, args, output):
        self.first_outputs = list(output) if isinstance(output, (tuple, list)) else [output]
        self.r = self.first_outputs[self.hidden_index] - self.block_input
        slot = self.slot
        self.diff, self.hit = None, False
        if slot.r_prev is not None and slot.r_prev.shape == self.r.shape and slot.calls >= self.warmup and (
                self.max_hits is None or slot.hits_in_row < self.max_hits):
            previous = slot.r_prev.double()
            self.diff = ((self.r.double() - previous).abs().mean() / previous.abs().mean()).item()
            self.hit = self.diff < self.threshold

    def _after_last(self, module, args, output):
        outputs = list(output) if isinstance(output, (tuple, list)) else [output]
        slot = self.slot
        slot.calls += 1
        if slot.taylor is None:
            slot.taylor = [TaylorSeer(self.taylor_order) for _ in outputs]
        for seer in slot.taylor:
            seer.mark_step_begin()
        if self.hit:
            slot.hits_in_row += 1
            replaced = [first + seer.approximate() for first, seer in zip(self.first_outputs, slot.taylor)]
            return tuple(replaced) if isinstance(output, (tuple, list)) else replaced[0]
        slot.hits_in_row = 0
        slot.r_prev = self.r
        for seer, last, first in zip(slot.taylor, outputs, self.first_outputs):
            seer.update(last - first)
        return None


# ----------------------------------------------------------------------------------------------
# Models and call sequences


@dataclass
class ModelSpec:
    build: Callable[[], nn.Module]
    inputs: Callable[[str], dict]  # size -> the first call's inputs
    latent: str  # the input that changes from step to step
    blocks: Callable[[nn.Module], list]
    hidden_input: Callable
    hidden_index: int
    output_of: Callable = lambda output: output


def _toy_spec():
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ToyDiT(depth=3).eval()

    return ModelSpec(build, lambda size: toy_inputs(**({} if size == "default" else dict(height=10, width=14,
                                                                                             text_length=7))),
                     "latents", lambda model: list(model.blocks), lambda args, kwargs: args[0], 0)


def _diffusers_spec(name: str, hidden_index: int, hidden_input: Callable, lists: tuple) -> ModelSpec:
    from tests.tiny_models import CASES

    case = CASES[name]
    return ModelSpec(case.build, lambda size: case.make_inputs(seed=0, size=size), "hidden_states",
                     lambda model: [block for attribute in lists for block in getattr(model, attribute)],
                     hidden_input, hidden_index, case.output)


def model_spec(name: str) -> ModelSpec:
    if name == "toy":
        return _toy_spec()
    if name == "flux":  # blocks return (encoder_hidden_states, hidden_states); called with keywords
        return _diffusers_spec("flux", 1, lambda args, kwargs: kwargs["hidden_states"],
                               ("transformer_blocks", "single_transformer_blocks"))
    if name == "wan_t2v":  # blocks return hidden_states; called positionally
        return _diffusers_spec("wan_t2v", 0, lambda args, kwargs: args[0], ("blocks",))
    if name == "hunyuan_video":  # blocks return (hidden_states, encoder_hidden_states); called positionally
        return _diffusers_spec("hunyuan_video", 0, lambda args, kwargs: args[0],
                               ("transformer_blocks", "single_transformer_blocks"))
    raise KeyError(name)


# Latent perturbation per step (relative to the first call's latents) and timestep scale per step: small
# steps give small diffs, large ones large diffs, so a middle threshold both hits and misses.
STEP_NOISE = [0.0, 0.002, 0.5, 0.003, 0.005, 1.0]


def step_inputs(spec: ModelSpec, base: dict, step: int, timestep_scale: float, seed: int = 0) -> dict:
    inputs = dict(base)
    generator = torch.Generator().manual_seed(100 + step + 1000 * seed)
    latent = base[spec.latent]
    inputs[spec.latent] = latent + STEP_NOISE[step % len(STEP_NOISE)] * torch.randn(latent.shape, generator=generator)
    inputs["timestep"] = base["timestep"] * timestep_scale
    return inputs


def generation_calls(spec: ModelSpec, size: str, steps: int) -> list[tuple[dict, Any, bool]]:
    """One generation: timesteps decreasing, one call per step. (inputs, slot, starts a generation)."""
    base = spec.inputs(size)
    return [(step_inputs(spec, base, step, 1.0 - 0.002 * step), 0, step == 0) for step in range(steps)]


def run_reference(spec: ModelSpec, model: nn.Module, calls, threshold: float, **policy) -> list[tuple]:
    reference = ReferenceCache(model, spec.blocks(model), spec.hidden_input, spec.hidden_index, threshold, **policy)
    try:
        results = []
        for inputs, slot, new_generation in calls:
            output, hit, diff = reference(inputs, slot, new_generation)
            results.append((spec.output_of(output), hit, diff))
        return results
    finally:
        reference.close()


def middle_threshold(spec: ModelSpec, model: nn.Module, calls) -> float:
    """A threshold that gives both hits and misses, with every diff at least 30% away from it. The
    candidates lie halfway (in ratio) between the diffs of consecutive calls."""
    diffs = sorted(diff for _, _, diff in run_reference(spec, model, calls, TINY) if diff is not None)
    best, best_margin = None, 0.0
    for low, high in zip(diffs, diffs[1:]):
        threshold = math.sqrt(low * high)
        decisions = run_reference(spec, model, calls, threshold)
        seen = [diff for _, _, diff in decisions if diff is not None]
        hits = sum(hit for _, hit, _ in decisions)
        if not seen or hits == 0 or hits == len(seen):
            continue
        margin = min(abs(math.log(diff / threshold)) for diff in seen)
        if margin > best_margin:
            best, best_margin = threshold, margin
    assert best is not None and best_margin > math.log(1.3), f"no threshold separates the diffs {diffs}"
    return best


def run_compiled(model: nn.Module, spec: ModelSpec, calls, options: dict, dynamic=None) -> list[tuple]:
    """(output, hit) per call; hit read from the change of cache_stats()."""
    torch._dynamo.reset()
    paracompile.reset_cache()
    backend.explanations.clear()
    compiled = torch.compile(model, backend="paracompile", options=options, dynamic=dynamic)
    results = []
    with torch.no_grad():
        for inputs, _, _ in calls:
            hits_before = sum(g["hits"] for g in paracompile.cache_stats())
            output = spec.output_of(compiled(**inputs))
            results.append((output, sum(g["hits"] for g in paracompile.cache_stats()) - hits_before == 1))
    return results


def compare(name: str, expected: list[tuple], actual: list[tuple]) -> None:
    """Same hit/miss on every call, and outputs within tolerance."""
    assert [hit for _, hit, _ in expected] == [hit for _, hit in actual], (
        f"{name}: hits expected {[h for _, h, _ in expected]} (diffs {[d for _, _, d in expected]}), "
        f"got {[h for _, h in actual]}")
    for index, ((want, _, _), (got, _)) in enumerate(zip(expected, actual)):
        assert_matches(got, want, f"{name} call {index}")


# ----------------------------------------------------------------------------------------------
# World size 1, "eager" compiler


@pytest.fixture(autouse=True)
def _fresh_state():
    # One thread: on a shared 2-core machine more make every small forward much slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    paracompile.reset_cache()
    yield
    torch._dynamo.reset()
    paracompile.reset_cache()
    torch.set_num_threads(threads)


EAGER = {"compiler": "eager"}


@pytest.mark.parametrize("threshold", [0.0, TINY], ids=["off", "tiny"])
def test_threshold_zero_or_tiny_equals_no_cache(threshold):
    spec = model_spec("toy")
    model = spec.build()
    calls = generation_calls(spec, "default", 4)
    eager = [(spec.output_of(model(**inputs)), False, None) for inputs, _, _ in calls]
    actual = run_compiled(model, spec, calls, dict(EAGER, threshold=threshold))
    compare("toy", eager, actual)
    stats = paracompile.cache_stats()
    assert stats == ([] if threshold == 0 else [dict(model=stats[0]["model"], generation=0, hits=0, misses=4)])


# HunyuanVideo's traces are the fast tier's slowest (3-4 s each): it runs with the slow tests.
SLOW_CACHE_MODELS = {"hunyuan_video"}


def _cache_models(*names):
    return [pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW_CACHE_MODELS)) for name in names]


@pytest.mark.parametrize("name", _cache_models("toy", "flux", "wan_t2v", "hunyuan_video"))
def test_huge_threshold_hits_with_cached_residual(name):
    """After the first call, every call is head(block-0 output + cached residual), which the reference
    computes by hand; and that differs from running the blocks."""
    spec = model_spec(name)
    model = spec.build()
    calls = generation_calls(spec, "default", 3)
    expected = run_reference(spec, model, calls, HUGE)
    assert [hit for _, hit, _ in expected] == [False, True, True]
    actual = run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE, explain=True))
    compare(name, expected, actual)
    with torch.no_grad():
        full = spec.output_of(model(**calls[2][0]))
    assert max_error(actual[2][0], full) > 100 * TOLERANCE, "the hit ran the blocks"
    report = "\n".join(backend.explanations)
    assert EXPECTED_REPORT[name] in report, report
    assert "(hidden, decides)" in report, report


EXPECTED_REPORT = {
    "toy": """  block loop: blocks (3 blocks)
  first block (always runs): blocks.0
  cached region: blocks.1 .. blocks.2 (2 blocks, skipped on a hit)
  streams: 1 cached""",
    # Image and text streams are carried; only the image stream is read after the loop.
    "flux": """  block loop: transformer_blocks (1 block), single_transformer_blocks (2 blocks)
  first block (always runs): transformer_blocks.0
  cached region: single_transformer_blocks.0 .. single_transformer_blocks.1 (2 blocks, skipped on a hit)
  streams: 1 cached""",
    # Its single blocks split text from image with negative bounds (`x[:, :-text_length]`); its token
    # refiner (a ModuleList nested in the text embedder) is not the block loop.
    "hunyuan_video": """  block loop: transformer_blocks (1 block), single_transformer_blocks (2 blocks)
  first block (always runs): transformer_blocks.0
  cached region: single_transformer_blocks.0 .. single_transformer_blocks.1 (2 blocks, skipped on a hit)
  streams: 1 cached""",
    "wan_t2v": """  block loop: blocks (2 blocks)
  first block (always runs): blocks.0
  cached region: blocks.1 .. blocks.1 (1 block, skipped on a hit)
  streams: 1 cached""",
}


def _deep_toy_spec(depth: int = 5) -> ModelSpec:
    spec = _toy_spec()

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ToyDiT(depth=depth).eval()

    return ModelSpec(build, spec.inputs, spec.latent, spec.blocks, spec.hidden_input, spec.hidden_index)


# (front blocks, back blocks, TaylorSeer order, warmup, max hits in a row): DBCache's Fn/Bn, TaylorSeer of order
# 1 and 2 (hits after 1, 2, 3 misses; with max hits 1, misses 2 calls apart, so the derivatives divide by 2).
CACHE_METHODS = {
    "dbcache_f2b1": (2, 1, 0, 0, None),
    "dbcache_f1b2": (1, 2, 0, 0, None),
    "taylorseer1": (1, 0, 1, 2, None),
    "taylorseer1_every_other": (1, 0, 1, 0, 1),
    "dbcache_f2b1_taylorseer2": (2, 1, 2, 3, None),
}


def _method_options(front, back, order, warmup, max_hits) -> dict:
    return dict(fbcache_front_blocks=front, fbcache_back_blocks=back, fbcache_taylorseer_order=order,
                fbcache_warmup=warmup, fbcache_max_hits=max_hits)


@pytest.mark.parametrize("method", list(CACHE_METHODS))
def test_dbcache_and_taylorseer_match_their_reference(method):
    """Each method's hits are the eager model's front blocks, the predicted residual, then its back blocks;
    and each differs from plain First Block Cache on those hits (so the test sees the method)."""
    front, back, order, warmup, max_hits = CACHE_METHODS[method]
    spec = _deep_toy_spec()
    model = spec.build()
    calls = generation_calls(spec, "default", 7)
    policy = dict(front=front, back=back, taylor_order=order, warmup=warmup, max_hits=max_hits)
    expected = run_reference(spec, model, calls, HUGE, **policy)
    hits = [hit for _, hit, _ in expected]
    assert sum(hits) >= 2 and not hits[0], hits
    actual = run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE, explain=True,
                                                   **_method_options(front, back, order, warmup, max_hits)))
    compare(method, expected, actual)
    plain = run_reference(spec, model, calls, HUGE, warmup=warmup, max_hits=max_hits)
    last_hit = max(index for index, hit in enumerate(hits) if hit)
    assert max_error(expected[last_hit][0], plain[last_hit][0]) > 5 * TOLERANCE, "the method changed nothing"
    report = "\n".join(backend.explanations)
    cached = 5 - front - back
    assert f"cached region: blocks.{front} .. blocks.{4 - back} ({cached} block{'s' if cached > 1 else ''}" in report
    assert ("back blocks (always run)" in report) == (back > 0), report
    assert ("TaylorSeer order" in report) == (order > 0), report


@pytest.mark.parametrize("name", _cache_models("flux", "hunyuan_video"))
def test_back_blocks_on_double_and_single_stream_models(name):
    """FLUX and HunyuanVideo: one double-stream block in front, the last single-stream block at the back
    (it reads both streams the cached block leaves), one cached block between."""
    spec = model_spec(name)
    model = spec.build()
    calls = generation_calls(spec, "default", 4)
    expected = run_reference(spec, model, calls, HUGE, back=1, taylor_order=1, warmup=2)
    assert [hit for _, hit, _ in expected] == [False, False, True, True]
    actual = run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE, fbcache_back_blocks=1,
                                                   fbcache_taylorseer_order=1, fbcache_warmup=2, explain=True))
    compare(name, expected, actual)
    report = "\n".join(backend.explanations)
    assert "back blocks (always run): single_transformer_blocks.1 .. single_transformer_blocks.1 (1 block)" in report
    assert "streams: 2 cached" in report, report


def test_front_blocks_decide_with_a_middle_threshold():
    spec = _deep_toy_spec()
    model = spec.build()
    calls = generation_calls(spec, "default", 6)
    reference = dict(front=3)
    diffs = sorted(d for _, _, d in run_reference(spec, model, calls, TINY, **reference) if d is not None)
    threshold = math.sqrt(diffs[0] * diffs[-1])  # some calls hit, some miss
    expected = run_reference(spec, model, calls, threshold, **reference)
    hits = [hit for _, hit, _ in expected]
    assert any(hits) and not all(hits[1:]), hits
    assert all(min(abs(math.log(d / threshold)) for d in diffs) > math.log(1.3) for _ in [0]), (diffs, threshold)
    compare("toy F3", expected, run_compiled(model, spec, calls, dict(EAGER, threshold=threshold,
                                                                     fbcache_front_blocks=3)))


def test_front_and_back_blocks_that_leave_nothing_to_skip_warn_and_run_without_the_cache():
    spec = model_spec("toy")  # 3 blocks
    model = spec.build()
    calls = generation_calls(spec, "default", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE, fbcache_front_blocks=2,
                                                       fbcache_back_blocks=1))
    messages = [str(w.message) for w in caught if "paracompile" in str(w.message)]
    assert any("the block loop has 3 blocks; 2 front and 1 back block(s)" in m for m in messages), messages
    with torch.no_grad():
        for (inputs, _, _), (output, hit) in zip(calls, actual):
            assert not hit
            assert_matches(output, model(**inputs))


def test_middle_threshold_hits_and_misses_like_the_reference():
    spec = model_spec("toy")
    model = spec.build()
    calls = generation_calls(spec, "default", 6)
    threshold = middle_threshold(spec, model, calls)
    compare("toy", run_reference(spec, model, calls, threshold), run_compiled(model, spec, calls,
                                                                             dict(EAGER, threshold=threshold)))


def test_timestep_increase_starts_a_new_generation():
    spec = model_spec("toy")
    model = spec.build()
    first = generation_calls(spec, "default", 3)
    second = [(dict(inputs, timestep=inputs["timestep"] * 1.05), slot, new) for inputs, slot, new in
              generation_calls(spec, "default", 2)]
    calls = first + second
    expected = run_reference(spec, model, calls, HUGE)
    assert [hit for _, hit, _ in expected] == [False, True, True, False, True]
    compare("toy", expected, run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE)))
    assert [(g["generation"], g["hits"], g["misses"]) for g in paracompile.cache_stats()] == [(0, 2, 1), (1, 1, 1)]


@pytest.mark.parametrize("timestep_on_device", [False, True], ids=["cpu_timestep", "device_timestep"])
def test_separate_cond_and_uncond_calls_keep_separate_slots(timestep_on_device, monkeypatch):
    """device_timestep: the runtime treats the timestep as living on a device (reading it costs a sync),
    so it computes the sums for both slots the call may land in and reads them with the timestep."""
    import paracompile.cache

    monkeypatch.setattr(paracompile.cache, "reads_without_sync", lambda tensor: not timestep_on_device)
    spec = model_spec("toy")
    model = spec.build()
    base = spec.inputs("default")
    uncond_text = torch.zeros_like(base["text"])
    calls = []
    for step in range(3):
        inputs = step_inputs(spec, base, step, 1.0 - 0.1 * step)
        calls.append((inputs, "cond", step == 0))
        calls.append((dict(inputs, text=uncond_text), "uncond", False))
    expected = run_reference(spec, model, calls, HUGE)
    assert [hit for _, hit, _ in expected] == [False, False, True, True, True, True]
    compare("toy", expected, run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE)))
    # One shared slot would have given the uncond calls the cond residual: a different output.
    swapped = run_reference(spec, model, [(inputs, 0, new) for inputs, _, new in calls], HUGE)
    assert max_error(swapped[3][0], expected[3][0]) > 100 * TOLERANCE


def test_warmup_and_max_hits_force_misses():
    spec = model_spec("toy")
    model = spec.build()
    calls = generation_calls(spec, "default", 8)
    policy = dict(warmup=2, max_hits=2)
    expected = run_reference(spec, model, calls, HUGE, **policy)
    assert [hit for _, hit, _ in expected] == [False, False, True, True, False, True, True, False]
    options = dict(EAGER, threshold=HUGE, fbcache_warmup=2, fbcache_max_hits=2)
    compare("toy", expected, run_compiled(model, spec, calls, options))


def test_a_residual_is_never_reused_at_another_shape_and_reset_cache_forgets():
    spec = model_spec("toy")
    model = spec.build()
    # Two sizes with no equal dims (Dynamo's duck sizing would otherwise specialise), one graph for both.
    small, large = toy_inputs(height=8, width=12, text_length=6), toy_inputs(height=10, width=14, text_length=7)
    # One generation (timesteps keep decreasing), sizes alternating.
    sequence = [(small, 1.0), (large, 0.9), (large, 0.8), (small, 0.7)]
    calls = [(dict(inputs, timestep=scale * small["timestep"]), 0, False) for inputs, scale in sequence]
    outputs = run_compiled(model, spec, calls, dict(EAGER, threshold=HUGE), dynamic=True)
    stats = paracompile.cache_stats()
    assert len(stats) == 1, f"expected one graph and one generation: {stats}"
    assert [hit for _, hit in outputs] == [False, False, True, False]
    assert (stats[0]["hits"], stats[0]["misses"]) == (1, 3)
    with torch.no_grad():
        for index in (0, 1, 3):  # misses compute the model
            assert_matches(outputs[index][0], model(**calls[index][0]), f"call {index}")

    compiled = torch.compile(model, backend="paracompile", options=dict(EAGER, threshold=HUGE), dynamic=True)
    later = dict(small, timestep=0.5 * small["timestep"])
    with torch.no_grad():
        compiled(**small)
        paracompile.reset_cache()
        assert paracompile.cache_stats() == []
        output = compiled(**later)  # a lower timestep, but the cache was reset: a new generation, a miss
        assert [(g["hits"], g["misses"]) for g in paracompile.cache_stats()] == [(0, 1)]
        assert_matches(output, model(**later))


def test_two_instances_of_one_class_keep_their_own_cache():
    """Dynamo serves both instances with one graph (their weights are inputs): the cache state must still
    be per model, or the second model would add the first one's residual."""
    spec = model_spec("toy")
    first = spec.build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        second = ToyDiT(depth=3).eval()
    calls = generation_calls(spec, "default", 3)
    expected = {name: run_reference(spec, model, calls, HUGE) for name, model in (("first", first), ("second", second))}
    compiled = {name: torch.compile(model, backend="paracompile", options=dict(EAGER, threshold=HUGE))
                for name, model in (("first", first), ("second", second))}
    with torch.no_grad():
        for index, (inputs, _, _) in enumerate(calls):
            for name in ("first", "second"):  # interleaved, like two experts or two pipelines
                assert_matches(compiled[name](**inputs), expected[name][index][0], f"{name} call {index}")
    stats = paracompile.cache_stats()
    assert sorted((g["hits"], g["misses"]) for g in stats) == [(2, 1), (2, 1)], stats


def test_no_block_loop_warns_and_does_not_cache():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)).eval()
    inputs = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            output = torch.compile(model, backend="paracompile", options=dict(EAGER, threshold=0.1))(inputs)
    assert any("no First Block Cache" in str(w.message) and "no block loop" in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    with torch.no_grad():
        assert_matches(output, model(inputs))
    assert paracompile.cache_stats() == []


@pytest.mark.parametrize("raw, message", [
    ({"fbcache_warmup": -1}, r"'fbcache_warmup' must be >= 0"),
    ({"fbcache_warmup": 1.5}, r"option 'fbcache_warmup' must be int"),
    ({"fbcache_max_hits": 0}, r"'fbcache_max_hits' must be >= 1 or None"),
    ({"fbcache_max_hits": True}, r"option 'fbcache_max_hits' must be int or NoneType"),
    ({"timestep_arg": 3}, r"option 'timestep_arg' must be str"),
    ({"timestep_arg": "t-1"}, r"'timestep_arg' must name a forward argument"),
    ({"fbcache_front_blocks": 0}, r"'fbcache_front_blocks' must be >= 1"),
    ({"fbcache_back_blocks": -1}, r"'fbcache_back_blocks' must be >= 0"),
    ({"fbcache_taylorseer_order": 5}, r"'fbcache_taylorseer_order' must be 0 .* to 4"),
    ({"fbcache_taylorseer_order": 1.0}, r"option 'fbcache_taylorseer_order' must be int"),
])
def test_bad_cache_options_raise(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_options(raw)


def test_cache_option_defaults():
    options = parse_options({"threshold": 0.08})
    assert (options.fbcache_warmup, options.fbcache_max_hits, options.timestep_arg) == (0, None, "timestep")


def test_timestep_arg_names_another_input():
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model_spec("toy").build()

        def forward(self, latents, text, sigma):
            return self.inner(latents, text, sigma)

    spec = model_spec("toy")
    model = Renamed().eval()
    calls = generation_calls(spec, "default", 3)
    renamed = [({"latents": i["latents"], "text": i["text"], "sigma": i["timestep"] * 1.3 ** n}, 0, False)
               for n, (i, _, _) in enumerate(calls)]  # sigma increases: each call starts a generation
    results = run_compiled(model, spec, renamed, dict(EAGER, threshold=HUGE, timestep_arg="sigma"))
    assert [hit for _, hit in results] == [False, False, False]
    assert len(paracompile.cache_stats()) == 3


# ----------------------------------------------------------------------------------------------
# World size 1, Inductor (once: Inductor compiles three parts, tens of seconds on CPU)


class SmallDiT(nn.Module):
    """Just enough DiT for the Inductor test: a token embedding, timestep conditioning, two residual
    self-attention blocks, an output projection (few kernels, so three Inductor compiles stay short)."""

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.qkv = nn.Linear(width, 3 * width)
            self.out = nn.Linear(width, width)

        def forward(self, x, conditioning):
            q, k, v = (self.qkv(x + conditioning)).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return x + self.out(attended.transpose(1, 2).flatten(2))

    def __init__(self, channels=4, width=16):
        super().__init__()
        self.embed = nn.Linear(channels, width)
        self.time = nn.Linear(1, width)
        self.blocks = nn.ModuleList(SmallDiT.Block(width) for _ in range(2))
        self.final = nn.Linear(width, channels)

    def forward(self, latents, timestep):
        x = self.embed(latents)
        conditioning = self.time(timestep[:, None])[:, None]
        for block in self.blocks:
            x = block(x, conditioning)
        return self.final(x)


@pytest.mark.slow
def test_inductor_matches_reference():
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return SmallDiT().eval()

    generator = torch.Generator().manual_seed(0)
    base = dict(latents=torch.randn(1, 12, 4, generator=generator), timestep=torch.tensor([0.9]))
    spec = ModelSpec(build, lambda size: base, "latents", lambda model: list(model.blocks),
                     lambda args, kwargs: args[0], 0)
    model = spec.build()
    calls = generation_calls(spec, "default", 3)
    expected = run_reference(spec, model, calls, HUGE)
    compare("small DiT (inductor)", expected,
            run_compiled(model, spec, calls, {"threshold": HUGE, "inductor": SCALAR_CPP}))


# ----------------------------------------------------------------------------------------------
# World size 2: every rank takes the same branch on every call and matches the single-process reference


WORLD_MODELS = ["toy", "flux", "wan_t2v"]
# toy_dynamic: dynamic shapes, two sizes in one generation (a residual is never reused at the other size).
# toy_plans_differ: the ranks' plan checks disagree (as if they had split the graph differently): the first
# call that could hit turns the cache off on both ranks, and every call runs all blocks.
# toy_ring, toy_batch: the other meshes (ring attention's kernels replace SDPA; the batch dim gives each rank
# other rows, so each rank's diff alone would differ).
# toy_dbcache: DBCache F2B1 with TaylorSeer order 1 on a 5-block toy (Ulysses, uneven shards).
WORLD_SCENARIOS = WORLD_MODELS + ["toy_ring", "toy_batch", "toy_dynamic", "toy_dbcache", "toy_plans_differ"]
DBCACHE_POLICY = dict(front=2, back=1, taylor_order=1, warmup=2)
MESHES = {"toy_ring": {"ring": 2}, "toy_batch": {"batch": 2}}


def _batch_of_two(calls):
    """Each call's inputs as a batch of two different rows (a CFG-like batch for the batch mesh)."""
    doubled = []
    for inputs, slot, new_generation in calls:
        inputs = dict(inputs, latents=torch.cat([inputs["latents"], 0.5 * inputs["latents"].flip(-1)]),
                      text=torch.cat([inputs["text"], torch.zeros_like(inputs["text"])]),
                      timestep=inputs["timestep"].expand(2))
        doubled.append((inputs, slot, new_generation))
    return doubled


def _dynamic_calls(spec):
    small, large = toy_inputs(height=8, width=12, text_length=6), toy_inputs(height=10, width=14, text_length=7, seed=1)
    sequence = [(small, 1.0), (small, 0.9), (large, 0.8), (large, 0.7), (small, 0.6)]
    return [(dict(inputs, timestep=scale * small["timestep"]), 0, False) for inputs, scale in sequence]


def _run_world_scenarios(rank, world_size, names):
    import paracompile.cache

    all_gather, plan_hash = paracompile.cache.dist.all_gather_into_tensor, paracompile.cache.plan_hash
    reduced_shapes = []

    def counting_all_gather(output, tensor, *args, **kwargs):
        reduced_shapes.append((tuple(tensor.shape), tensor.dtype))
        return all_gather(output, tensor, *args, **kwargs)

    paracompile.cache.dist.all_gather_into_tensor = counting_all_gather
    results = {}
    try:
        for name in names:
            started = time.perf_counter()
            spec = model_spec(name.split("_")[0] if name.startswith("toy") else name)
            if name == "toy_dbcache":
                spec = _deep_toy_spec()
            model = spec.build()
            dynamic, policy, method_options = None, {}, {}
            if name == "toy_dbcache":
                policy = DBCACHE_POLICY
                method_options = _method_options(2, 1, 1, 2, None)
                calls, threshold = generation_calls(spec, "uneven", 6), HUGE
            elif name == "toy_dynamic":
                calls, threshold, dynamic = _dynamic_calls(spec), HUGE, True
            else:
                calls = generation_calls(spec, "uneven", 6)
                if name == "toy_batch":
                    calls = _batch_of_two(calls)
                threshold = HUGE if name == "toy_plans_differ" else middle_threshold(spec, model, calls)
            expected = run_reference(spec, model, calls, threshold, **policy)
            if name == "toy_plans_differ":
                paracompile.cache.plan_hash = lambda signature: rank + 1.0
                expected = [(output, False, None) for output, _, _ in run_reference(spec, model, calls, TINY)]
            reduced_shapes.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                options = dict(EAGER, threshold=threshold, **method_options,
                               **({"mesh": MESHES[name]} if name in MESHES else {}))
                actual = run_compiled(model, spec, calls, options, dynamic=dynamic)
            paracompile.cache.plan_hash = plan_hash
            results[name] = dict(expected=expected, actual=actual, threshold=threshold, reduced=list(reduced_shapes),
                                 explanations=list(backend.explanations), stats=paracompile.cache_stats(),
                                 warnings=[str(w.message) for w in caught if "paracompile" in str(w.message)],
                                 seconds=time.perf_counter() - started)
    finally:
        paracompile.cache.dist.all_gather_into_tensor, paracompile.cache.plan_hash = all_gather, plan_hash
    return results


WORLD2 = RanksJob(_run_world_scenarios, 2, WORLD_SCENARIOS, timeout=900)


@pytest.fixture(scope="module")
def world2():
    per_rank = WORLD2.result()
    return {name: [ranks[name] for ranks in per_rank] for name in WORLD_SCENARIOS}


@pytest.mark.slow
@pytest.mark.parametrize("name", WORLD_MODELS + ["toy_ring", "toy_batch", "toy_dynamic", "toy_dbcache"])
def test_two_ranks_take_the_same_branch_and_match_one_rank(world2, name):
    ranks = world2[name]
    for rank, result in enumerate(ranks):
        assert any("first block cache: threshold" in text for text in result["explanations"]), result["explanations"]
        compare(f"{name} rank {rank}", result["expected"], result["actual"])
        assert not result["warnings"], result["warnings"]
    assert [hit for _, hit in ranks[0]["actual"]] == [hit for _, hit in ranks[1]["actual"]]
    assert ranks[0]["stats"] == ranks[1]["stats"]
    # Every call, hit or forced miss, makes one all-gather of one row of numbers (flags, the timestep, the
    # plan's hash, the sums): the diff is global, and every rank makes the same collective calls.
    for result in ranks:
        assert result["reduced"] == [((10,), torch.float64)] * len(result["actual"]), result["reduced"]


@pytest.mark.slow
def test_ranks_with_different_plans_turn_the_cache_off_together(world2):
    ranks = world2["toy_plans_differ"]
    for rank, result in enumerate(ranks):
        compare(f"rank {rank}", result["expected"], result["actual"])  # every call misses, matches eager
        assert any("planned different First Block Caches" in text for text in result["warnings"]), result["warnings"]
        # The first call's all-gather found the disagreement; every call still makes its one all-gather.
        assert result["reduced"] == [((10,), torch.float64)] * len(result["actual"]), result["reduced"]
    assert ranks[0]["stats"] == ranks[1]["stats"]
