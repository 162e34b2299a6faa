"""Correct or loud at the edges users hit: gradients, Python-float timesteps, ranks given different inputs,
cache controls called on some ranks, in-place writes through views, and the memory layout of gathered
tensors.

Every multi-rank scenario runs inside one `run_on_ranks` call on 2 ranks (gloo, `compiler="eager"`), each
after `torch._dynamo.reset()`, and each test reads its scenario's per-rank result. Single-process checks run
in this process.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paracompile
import paracompile.backend as backend
from tests.conftest import assert_matches
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, rotary, toy_inputs

EAGER = {"compiler": "eager"}
MESHES = {"ulysses2": {"ulysses": 2}, "ring2": {"ring": 2}}
HUGE, TINY = 1e9, 1e-12


# ----------------------------------------------------------------------------------------------
# Models


class FloatTimestepDiT(nn.Module):
    """The toy DiT called the way hand-written sampling loops call a model: the timestep a Python float (or
    an int: DDPM-style loops count down from 999)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.inner = ToyDiT(**kwargs)

    def forward(self, latents, text, timestep):
        return self.inner(latents, text, torch.full((latents.shape[0],), timestep / 1000 if isinstance(timestep, int)
                                                    else timestep, dtype=torch.float32))


class HiddenStates(nn.Module):
    """The toy DiT without its unpatchify: returns the token-sharded hidden states themselves (gathered at
    the output) and a `view` that merges batch and tokens (gathered first, then viewed in the graph)."""

    def __init__(self):
        super().__init__()
        self.inner = ToyDiT()

    def forward(self, latents, text, timestep):
        model = self.inner
        x = model.embed(latents).flatten(2).transpose(1, 2).contiguous()
        context, conditioning = model.text(text), model.time(timestep[:, None])
        cos, sin = rotary(torch.arange(context.shape[1] + x.shape[1]), x.shape[-1] // model.heads)
        for block in model.blocks:
            x, context = block(x, context, conditioning, cos, sin)
        return x, x.view(-1, x.shape[-1]).sum(-1)


class WritesIntoTokens(nn.Module):
    """Self-attention over text + image tokens that in-place writes assembled or edited.

    kinds: into a fresh (replicated) buffer through a row `select` then a token slice (Lumina2 packs its
    tokens so), or through a batch slice; into a projected (token-sharded) tensor through a feature-column
    slice, a nested view, a token slice that is no segment boundary, an index_put, and a write after which a
    view taken before it is read."""

    KINDS = ("row_select", "batch_slice", "column_slice", "nested_view", "token_slice", "index_put",
             "view_before_write")

    def __init__(self, kind: str, width: int = 16, heads: int = 4):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.project = nn.Linear(width, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, image, text):
        batch, text_length, width = text.shape
        kind = self.kind
        extra = None
        if kind == "row_select":
            joint = image.new_zeros(batch, text_length + image.shape[1], width)
            for row in range(batch):
                joint[row, :text_length] = text[row]
                joint[row, text_length:] = image[row]
        elif kind == "batch_slice":
            joint = image.new_zeros(batch, text_length + image.shape[1], width)
            joint[:, :text_length] = text
            joint[:, text_length:] = image
        else:
            joint = self.project(torch.cat([text, image], dim=1))
            if kind == "column_slice":
                joint[..., :4] = 0.0
                joint[:, :, 4:8] *= 2.0
            elif kind == "nested_view":
                joint.view(batch, -1, self.heads, width // self.heads)[:, :, 1] += 1.0
            elif kind == "token_slice":
                joint[:, 3:5] = 0.5
            elif kind == "index_put":
                joint[:, torch.tensor([1, 5, 9])] = -1.0
            elif kind == "view_before_write":
                extra = joint[:, :, :8]
                joint.mul_(2.0)
        q, k, v = self.qkv(joint).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        result = self.out(attended)
        return result if extra is None else result + extra.sum(-1, keepdim=True)


def _write_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 35, 16, generator=generator), torch.randn(2, 7, 16, generator=generator)


class GraphBreakView(nn.Module):
    """A graph break between a token-sharded graph output and a `view` of it (HiDream's expert gate)."""

    def __init__(self):
        super().__init__()
        self.inner = HiddenStates()

    def forward(self, latents, text, timestep):
        x, _ = self.inner(latents, text, timestep)
        torch._dynamo.graph_break()
        return x.view(-1, x.shape[-1]) * 2.0


# ----------------------------------------------------------------------------------------------
# The ranks' scenarios


def _compile(model, **options):
    return torch.compile(model, backend="paracompile", options=dict(EAGER, **options))


def _error_text(error: BaseException) -> str:
    inner = getattr(error, "inner_exception", None)
    return f"{type(inner or error).__name__}: {inner or error}"


def _backward(rank):
    torch.manual_seed(0)
    model = ToyDiT()
    inputs = toy_inputs()
    expected = model(**inputs)
    # Grad mode on, as a user who forgot no_grad runs it, with an option whose backward is not supported
    # (First Block Cache; without it, every mesh trains: tests/test_training.py).
    output = _compile(model, threshold=0.5)(**inputs)
    result = dict(error=(output - expected).abs().max().item(), requires_grad=output.requires_grad)
    try:
        output.square().mean().backward()
        result["backward"] = "ran"
    except RuntimeError as error:
        result["backward"] = str(error)
    result["grads"] = [name for name, p in model.named_parameters() if p.grad is not None]
    return result


def _float_timestep_loop(rank, mesh, threshold, steps=10, integer=False):
    torch.manual_seed(0)
    model = FloatTimestepDiT().eval()
    base = toy_inputs()
    base.pop("timestep")
    paracompile.reset_cache()
    compiled = _compile(model, mesh=mesh, threshold=threshold)
    torch._dynamo.utils.counters.clear()
    errors = []
    with torch.no_grad():
        for generation in range(2):
            for step in range(steps):
                timestep = 1.0 - step / steps
                timestep = round(1000 * timestep) if integer else timestep
                latents = base["latents"] * (1 + 0.01 * step)
                output = compiled(latents, base["text"], timestep)
                if threshold < 1:
                    errors.append((output - model(latents, base["text"], timestep)).abs().max().item())
    return dict(errors=errors, graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                stats=paracompile.cache_stats())


def _disagree(rank, case):
    torch.manual_seed(0)
    model = ToyDiT().eval()
    mode = "always" if case.startswith("always") else "first"
    compiled = _compile(model, check_inputs=mode)
    inputs = toy_inputs()
    if case == "seed":
        inputs = toy_inputs(seed=rank)
    elif case == "timestep":
        inputs["timestep"] = inputs["timestep"] + rank
    elif case == "transposed":
        inputs = toy_inputs(height=8, width=12) if rank == 0 else toy_inputs(height=12, width=8)
    elif case == "token_count":
        inputs = toy_inputs(height=8, width=8 + 4 * rank)
    calls = [inputs]
    if case == "always_later_call":
        calls = [inputs, dict(inputs, timestep=inputs["timestep"] + rank)]
    outcome = []
    with torch.no_grad():
        for call in calls:
            try:
                compiled(**call)
                outcome.append("ran")
            except Exception as error:
                outcome.append(_error_text(error))
    return outcome


def _check_inputs_off_makes_no_collective(rank):
    import paracompile.runtime as runtime

    calls = []
    original = runtime.dist.all_reduce
    runtime.dist.all_reduce = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        torch.manual_seed(0)
        model = ToyDiT().eval()
        with torch.no_grad():
            _compile(model, check_inputs="off")(**toy_inputs())
            off = len(calls)
            torch._dynamo.reset()
            _compile(model, check_inputs="always")(**toy_inputs())
            _compile(model, check_inputs="always")(**toy_inputs())
    finally:
        runtime.dist.all_reduce = original
    return dict(off=off, always=len(calls) - off)


def _reset_on_one_rank(rank):
    torch.manual_seed(0)
    model = ToyDiT().eval()
    inputs = toy_inputs()
    paracompile.reset_cache()
    compiled = _compile(model, threshold=HUGE)
    hits, outputs = [], []
    with torch.no_grad():
        for step in range(6):
            if step == 3 and rank == 0:
                paracompile.reset_cache()
            before = sum(g["hits"] for g in paracompile.cache_stats())
            call = dict(inputs, timestep=inputs["timestep"] * (1 - 0.1 * step))
            outputs.append(compiled(**call))
            hits.append(sum(g["hits"] for g in paracompile.cache_stats()) - before == 1)
        expected_reset_step = model(**dict(inputs, timestep=inputs["timestep"] * 0.7))
    return dict(hits=hits, generations=[g["generation"] for g in paracompile.cache_stats()],
                reset_step_error=(outputs[3] - expected_reset_step).abs().max().item(), outputs=outputs)


def _writes(rank, kind, mesh):
    torch.manual_seed(0)
    model = WritesIntoTokens(kind).eval()
    image, text = _write_inputs()
    with torch.no_grad():
        expected = model(image, text)
        try:
            output = _compile(model, mesh=mesh)(image, text)
        except Exception:
            return dict(error=traceback.format_exc())
    return dict(error=None, max_error=(output - expected).abs().max().item())


def _layouts(rank):
    torch.manual_seed(0)
    results = {}
    inputs = toy_inputs(batch=2)
    for name, model in (("hidden_states", HiddenStates().eval()), ("graph_break", GraphBreakView().eval())):
        torch._dynamo.reset()
        with torch.no_grad():
            expected = model(**inputs)
            try:
                output = _compile(model)(**inputs)
            except Exception:
                results[name] = dict(error=traceback.format_exc())
                continue
        expected = expected if isinstance(expected, tuple) else (expected,)
        output = output if isinstance(output, tuple) else (output,)
        results[name] = dict(error=None, strides=[o.stride() for o in output], eager=[e.stride() for e in expected],
                             max_error=max((o - e).abs().max().item() for o, e in zip(output, expected)))
    return results


def _stats_across_recompile(rank):
    torch.manual_seed(0)
    model = ToyDiT().eval()
    paracompile.reset_cache()
    compiled = _compile(model, threshold=TINY)
    with torch.no_grad():
        for step, size in enumerate([dict(), dict(), dict(height=8, width=12), dict(height=10, width=14)]):
            inputs = toy_inputs(**size)
            compiled(**dict(inputs, timestep=inputs["timestep"] * 0 + 1 - 0.1 * step))
    return paracompile.cache_stats()


def _run_scenarios(rank, world_size):
    scenarios = {
        "backward": lambda: _backward(rank),
        **{f"float_{mesh}": (lambda mesh=mesh: _float_timestep_loop(rank, MESHES[mesh], 0.0)) for mesh in MESHES},
        "float_fbcache": lambda: _float_timestep_loop(rank, MESHES["ulysses2"], HUGE),
        "float_fbcache_tiny": lambda: _float_timestep_loop(rank, MESHES["ring2"], TINY),
        "int_fbcache": lambda: _float_timestep_loop(rank, MESHES["ulysses2"], HUGE, integer=True),
        "int_tiny": lambda: _float_timestep_loop(rank, MESHES["ring2"], TINY, integer=True),
        **{f"disagree_{case}": (lambda case=case: _disagree(rank, case))
           for case in ("same", "seed", "timestep", "transposed", "token_count", "always_later_call")},
        "check_inputs_off": lambda: _check_inputs_off_makes_no_collective(rank),
        "reset_on_one_rank": lambda: _reset_on_one_rank(rank),
        **{f"writes_{kind}_{mesh}": (lambda kind=kind, mesh=mesh: _writes(rank, kind, MESHES[mesh]))
           for kind in WritesIntoTokens.KINDS for mesh in MESHES},
        "layouts": lambda: _layouts(rank),
        "stats_across_recompile": lambda: _stats_across_recompile(rank),
    }
    results = {}
    for name, scenario in scenarios.items():
        torch._dynamo.reset()
        try:
            results[name] = scenario()
        except Exception:
            results[name] = dict(scenario_failed=traceback.format_exc())
    return results


TWO_RANKS = RanksJob(_run_scenarios, 2, timeout=900)


@pytest.fixture(scope="module")
def ranks():
    return TWO_RANKS.result()


def _per_rank(ranks, name):
    results = [per_rank[name] for per_rank in ranks]
    for result in results:
        assert not (isinstance(result, dict) and "scenario_failed" in result), result.get("scenario_failed")
    return results


# ----------------------------------------------------------------------------------------------
# Backward: loud on a mesh, exact on one process


@pytest.mark.slow
def test_backward_on_a_mesh_raises_on_every_rank_and_forward_with_grad_stays_exact(ranks):
    for result in _per_rank(ranks, "backward"):
        assert result["error"] < 1e-4, result
        assert result["requires_grad"]
        assert "backward through this graph is not supported yet: First Block Cache" in result["backward"], result
        assert result["grads"] == [], "no parameter may receive a gradient"


def test_backward_with_first_block_cache_raises():
    torch._dynamo.reset()
    paracompile.reset_cache()
    torch.manual_seed(0)
    model = ToyDiT()
    inputs = toy_inputs()
    try:
        output = _compile(model, threshold=0.05)(**inputs)
        assert_matches(output, model(**inputs))
        with pytest.raises(RuntimeError, match="backward through First Block Cache"):
            output.sum().backward()
    finally:
        torch._dynamo.reset()
        paracompile.reset_cache()


# Backward on one process through Inductor: tests/test_toy_dit.py (world size one).


# ----------------------------------------------------------------------------------------------
# Python-float timesteps


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_float_timestep_loop_matches_eager_without_recompiling_per_value(ranks, mesh):
    for result in _per_rank(ranks, f"float_{mesh}"):
        assert len(result["errors"]) == 20 and max(result["errors"]) < 1e-4, result["errors"]
        # The first value is specialised, the second compiles a graph that takes the float as an input;
        # the other 18 values reuse it.
        assert result["graphs"] <= 2, result["graphs"]


@pytest.mark.slow
def test_float_and_int_timesteps_mark_first_block_cache_generations(ranks):
    for name in ("float_fbcache", "float_fbcache_tiny", "int_fbcache", "int_tiny"):
        for result in _per_rank(ranks, name):
            assert result["graphs"] <= 2, result["graphs"]
            # Two loops of 10 decreasing timesteps: two generations, each starting with a miss.
            stats = [(g["hits"], g["misses"]) for g in result["stats"]]
            if name.endswith("fbcache"):
                assert stats == [(9, 1), (9, 1)], stats
            else:
                assert stats == [(0, 10), (0, 10)], stats
                assert max(result["errors"]) < 1e-4, result["errors"]


def test_float_timestep_on_one_process_with_first_block_cache():
    torch._dynamo.reset()
    paracompile.reset_cache()
    torch.manual_seed(0)
    model = FloatTimestepDiT().eval()
    inputs = toy_inputs()
    compiled = _compile(model, threshold=TINY)
    try:
        with torch.no_grad():
            for step in range(10):
                assert_matches(compiled(inputs["latents"], inputs["text"], 1.0 - step / 10),
                               model(inputs["latents"], inputs["text"], 1.0 - step / 10), f"step {step}")
        assert [(g["hits"], g["misses"]) for g in paracompile.cache_stats()] == [(0, 10)]
    finally:
        torch._dynamo.reset()
        paracompile.reset_cache()


# ----------------------------------------------------------------------------------------------
# Ranks given different inputs


@pytest.mark.slow
@pytest.mark.parametrize("case, names", [
    ("seed", "input 'latents' (1, 4, 8, 8) holds other values on rank 1"),
    ("timestep", "input 'timestep' (1,) holds other values on rank 1"),
    ("transposed", "input 'latents' has shape (1, 4, 8, 12) on rank 0 and (1, 4, 12, 8) on rank 1"),
    ("token_count", "input 'latents' has shape (1, 4, 8, 8) on rank 0 and (1, 4, 8, 12) on rank 1"),
])
def test_ranks_given_different_inputs_raise_on_every_rank(ranks, case, names):
    for outcome in _per_rank(ranks, f"disagree_{case}"):
        assert len(outcome) == 1 and outcome[0].startswith("RanksDisagreeError"), outcome
        assert names in outcome[0], outcome[0]


@pytest.mark.slow
def test_same_inputs_pass_the_check(ranks):
    assert _per_rank(ranks, "disagree_same") == [["ran"], ["ran"]]


@pytest.mark.slow
def test_check_inputs_always_catches_a_later_call(ranks):
    for outcome in _per_rank(ranks, "disagree_always_later_call"):
        assert outcome[0] == "ran" and "input 'timestep' (1,) holds other values" in outcome[1], outcome


@pytest.mark.slow
def test_check_inputs_off_makes_no_collective_and_always_checks_every_call(ranks):
    for result in _per_rank(ranks, "check_inputs_off"):
        assert result["off"] == 0, result
        # 'always': the first call checks weights and data (2 all-reduces), the second the data (2 more).
        assert result["always"] == 4, result


@pytest.mark.parametrize("value", ["sometimes", "", "ALWAYS"])
def test_check_inputs_option_is_validated(value):
    from paracompile.options import parse_options

    with pytest.raises(ValueError, match=r"option 'check_inputs' must be one of \['first', 'always', 'off'\]"):
        parse_options({"check_inputs": value})


# ----------------------------------------------------------------------------------------------
# Cache controls


@pytest.mark.slow
def test_reset_cache_on_one_rank_resets_every_rank_at_the_next_call(ranks):
    results = _per_rank(ranks, "reset_on_one_rank")
    for result in results:
        # HUGE threshold: every call that may hit does; the reset makes call 3 a miss on both ranks.
        assert result["hits"] == [False, True, True, False, True, True], result["hits"]
        assert result["reset_step_error"] < 1e-4, result
    assert results[1]["generations"] == [0, 1]  # rank 1 never called reset_cache: it sees both generations
    assert results[0]["generations"] == [1]  # rank 0's statistics were cleared by its own call
    for first, second in zip(results[0]["outputs"], results[1]["outputs"]):
        assert torch.equal(first, second)


@pytest.mark.slow
def test_cache_stats_keep_one_model_across_recompiles(ranks):
    for stats in _per_rank(ranks, "stats_across_recompile"):
        assert [(g["model"], g["generation"], g["misses"]) for g in stats] == [(stats[0]["model"], 0, 4)], stats


def test_cache_stats_keep_one_model_across_recompiles_on_one_process():
    torch._dynamo.reset()
    stats = _stats_across_recompile(0)
    torch._dynamo.reset()
    assert [(g["model"], g["generation"], g["misses"]) for g in stats] == [(stats[0]["model"], 0, 4)], stats


class _Sigma(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ToyDiT().eval()

    def forward(self, latents, text, sigma):
        return self.inner(latents, text, sigma)


def test_timestep_arg_that_names_no_input_raises_at_compile_time():
    torch._dynamo.reset()
    model = _Sigma().eval()
    inputs = toy_inputs()
    inputs["sigma"] = inputs.pop("timestep")
    try:
        with torch.no_grad(), pytest.raises(Exception) as info:
            _compile(model, threshold=0.1)(**inputs)
    finally:
        torch._dynamo.reset()
    message = _error_text(info.value)
    assert message.startswith("ValueError"), message
    assert "option 'timestep_arg' is 'timestep', but the compiled graph has no input of that name" in message
    assert "'latents', 'sigma', 'text'" in message, message


def test_timestep_arg_none_turns_generation_detection_off():
    torch._dynamo.reset()
    paracompile.reset_cache()
    model = _Sigma().eval()
    inputs = toy_inputs()
    inputs["sigma"] = inputs.pop("timestep")
    compiled = _compile(model, threshold=HUGE, timestep_arg=None)
    try:
        with torch.no_grad():
            assert_matches(compiled(**inputs), model(**inputs))
            compiled(**inputs)
        assert [(g["hits"], g["misses"]) for g in paracompile.cache_stats()] == [(1, 1)]
        assert "timestep: none (timestep_arg=None)" in backend.explanations[-1]
    finally:
        torch._dynamo.reset()
        paracompile.reset_cache()


# ----------------------------------------------------------------------------------------------
# In-place writes and memory layouts


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("kind", WritesIntoTokens.KINDS)
def test_in_place_writes_through_views_land_where_they_belong(ranks, kind, mesh):
    for result in _per_rank(ranks, f"writes_{kind}_{mesh}"):
        assert result["error"] is None, result["error"]
        assert result["max_error"] < 1e-4, result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hidden_states", "graph_break"])
def test_gathered_tensors_keep_eager_strides(ranks, name):
    for result in _per_rank(ranks, "layouts"):
        assert result[name]["error"] is None, result[name]["error"]
        assert result[name]["strides"] == result[name]["eager"], result[name]
        assert result[name]["max_error"] < 1e-4, result[name]
