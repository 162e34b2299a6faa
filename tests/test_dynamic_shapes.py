"""Calls at several resolutions: recompiles (static, then Dynamo's automatic dynamic shapes) and
`dynamic=True`, with the eager compiler on 2 ranks (`dynamic=True` also on 4) and with Inductor on 2 ranks.

Every call is compared with eager on the same inputs, and every compile's rewritten graph must still
hold the Ulysses all-to-alls (symbolic token counts must not make paracompile fall back).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import (assert_attention_split, assert_ranks_match, report_sections,
                            run_compiled_vs_eager, without_callables)
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

pytestmark = pytest.mark.slow  # every test here spawns process groups

DEFAULT = dict()  # 8x8 latents: 16 image tokens, 6 text tokens
OTHER = dict(height=8, width=12)  # 24 image tokens
THIRD = dict(height=10, width=14, text_length=7)  # 35 image + 7 text tokens: uneven for 2 and 4 ranks
FOURTH = dict(height=12, width=8, text_length=5)  # 24 image + 5 text tokens
LARGER = dict(height=12, width=16, text_length=8)  # 48 image + 8 text tokens

# name -> (compile kwargs, model kwargs, sizes called in order). `dynamic=None` is torch.compile's
# default: the first call compiles static shapes, a call at another size recompiles with the sizes
# that changed marked dynamic.
EAGER_RUNS = {
    "recompile": (dict(), dict(), [DEFAULT, OTHER, THIRD]),
    # Sizes chosen so that no two input sizes are equal: with duck sizing, equal sizes share a
    # symbol and a later call where they differ would recompile.
    "dynamic_true": (dict(dynamic=True), dict(), [OTHER, THIRD, FOURTH]),
    "recompile_masked": (dict(), dict(), [dict(masked=True), dict(THIRD, masked=True)]),
}
# Inductor compiles take tens of seconds on CPU, so Inductor gets one model depth and few sizes.
INDUCTOR_RUNS = {
    # Static compile at an uneven size, then a recompile with dynamic sizes, then a size that the
    # dynamic graph serves.
    "recompile": (dict(), dict(depth=1), [THIRD, DEFAULT, OTHER]),
    "dynamic_true": (dict(dynamic=True), dict(depth=1), [OTHER, LARGER]),
}


def _options(compiler):
    if compiler == "inductor":
        # Scalar C++ kernels (no vectorisation) compile ~30% faster on CPU; the paracompile path is
        # the same. FLUX under Inductor (tests/test_diffusers_models.py) keeps the default codegen.
        return {"compiler": "inductor", "inductor": {"cpp.vec_isa_ok": False}}
    return {"compiler": compiler}


def _run_sequences(rank, world_size, runs, compiler):
    results = {}
    for name, (compile_kwargs, model_kwargs, sizes) in runs.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ToyDiT(**model_kwargs).eval()
        compiled = None
        calls = []
        for size in sizes:
            result = run_compiled_vs_eager(model, toy_inputs(**size), _options(compiler),
                                           record=(compiler == "eager"), compiled=compiled, **compile_kwargs)
            compiled = result.get("compiled")
            calls.append(without_callables(result))
            if result["error"] is not None:
                break
        results[name] = calls
    torch._dynamo.reset()
    return results


def _by_run(per_rank, runs):
    return {name: [ranks[name] for ranks in per_rank] for name in runs}


# 4 ranks on 2 cores compile at half speed: the masked sequence runs on 2 ranks only.
# On 4 ranks (half speed on 2 cores) the symbolic sizes only: a recompile at a new size is the 2-rank case again.
EAGER_RUNS_BY_WORLD_SIZE = {2: list(EAGER_RUNS), 4: ["dynamic_true"]}
WORLD_SIZES = tuple(EAGER_RUNS_BY_WORLD_SIZE)


def _ws_id(world_size):
    return f"ws{world_size}"


EAGER_WORLDS = {world_size: RanksJob(_run_sequences, world_size, {name: EAGER_RUNS[name] for name in names}, "eager",
                                      timeout=600)
                for world_size, names in EAGER_RUNS_BY_WORLD_SIZE.items()}


def _run_world(world_size):
    return world_size, _by_run(EAGER_WORLDS[world_size].result(), EAGER_RUNS_BY_WORLD_SIZE[world_size])


# One module-scoped fixture per world size, looked up by name (`eager_results` below), so that
# each runs once however pytest orders the tests.
@pytest.fixture(scope="module")
def eager_ws2():
    return _run_world(2)


@pytest.fixture(scope="module")
def eager_ws4():
    return _run_world(4)


@pytest.fixture
def eager_results(request, world_size):
    return request.getfixturevalue(f"eager_ws{world_size}")


def _on(world_sizes=WORLD_SIZES):
    return pytest.mark.parametrize("world_size", world_sizes, ids=_ws_id)


INDUCTOR_WORLD = RanksJob(_run_sequences, 2, INDUCTOR_RUNS, "inductor", timeout=900)


@pytest.fixture(scope="module")
def inductor_results():
    return 2, _by_run(INDUCTOR_WORLD.result(), INDUCTOR_RUNS)


def _calls(results, name, index):
    """[rank 0's result of call `index`, rank 1's, ...]"""
    per_rank = results[name]
    for rank, calls in enumerate(per_rank):
        # A rank stops calling after the first error, which is then its last result.
        assert len(calls) > index, f"rank {rank} stopped at call {len(calls) - 1}:\n{calls[-1]['error']}"
    return [calls[index] for calls in per_rank]


def _assert_rewritten_with_ulysses(result, world_size):
    assert result["graphs"], "no rewritten graph"
    for graph, report in zip(result["graphs"], result["explanations"]):
        assert graph["all_to_all"] >= 4, report  # 2 blocks' joint self-attention, >= 2 each
        attention = report_sections(report)["attention"]
        assert attention and not any("replicated" in line for line in attention), report


# --- eager compiler, 2 and 4 ranks (4: dynamic=True only) -------------------------------------------------------------


@_on([2])
@pytest.mark.parametrize("index", range(3), ids=["default", "other", "third"])
def test_recompile_matches_eager(eager_results, index):
    _, results = eager_results
    assert_ranks_match(_calls(results, "recompile", index), f"call {index}")


@_on([2])
def test_recompile_compiles_again_at_a_new_resolution(eager_results):
    world_size, results = eager_results
    first, second = _calls(results, "recompile", 0), _calls(results, "recompile", 1)
    for rank in range(world_size):
        assert len(first[rank]["graphs"]) == 1, "the first call compiles once"
        assert len(second[rank]["graphs"]) == 1, "a call at another resolution recompiles"
        _assert_rewritten_with_ulysses(first[rank], world_size)
        _assert_rewritten_with_ulysses(second[rank], world_size)


@pytest.mark.parametrize("world_size, run", [
    (world_size, run) for world_size, runs in EAGER_RUNS_BY_WORLD_SIZE.items() for run in runs
], ids=lambda value: _ws_id(value) if isinstance(value, int) else value)
def test_attention_work_is_split_at_every_size(eager_results, run):
    world_size, results = eager_results
    for index in range(len(EAGER_RUNS[run][2])):
        for result in _calls(results, run, index):
            assert result["error"] is None, result["error"]
            assert_attention_split(result["eager_calls"], result["local_calls"], world_size)


@_on()
@pytest.mark.parametrize("index", range(3), ids=["other", "third", "fourth"])
def test_dynamic_true_matches_eager(eager_results, index):
    _, results = eager_results
    assert_ranks_match(_calls(results, "dynamic_true", index), f"dynamic=True call {index}")


@_on()
def test_dynamic_true_compiles_once_for_all_sizes(eager_results):
    world_size, results = eager_results
    counts = [[len(result["graphs"]) for result in _calls(results, "dynamic_true", index)]
              for index in range(3)]
    # One symbolic graph serves all three sizes, including the uneven one: no recompiles.
    assert counts == [[1] * world_size, [0] * world_size, [0] * world_size]
    for result in _calls(results, "dynamic_true", 0):
        _assert_rewritten_with_ulysses(result, world_size)


@_on([2])
@pytest.mark.parametrize("index", range(2), ids=["default", "uneven"])
def test_masked_recompile_matches_eager(eager_results, index):
    _, results = eager_results
    assert_ranks_match(_calls(results, "recompile_masked", index), f"masked call {index}")


# --- Inductor, 2 ranks ---------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3), ids=["uneven_static", "default_recompiled", "other"])
def test_inductor_recompile_matches_eager(inductor_results, index):
    _, results = inductor_results
    assert_ranks_match(_calls(results, "recompile", index), f"inductor call {index}")


def test_inductor_recompiles_at_a_new_resolution(inductor_results):
    world_size, results = inductor_results
    first, second = _calls(results, "recompile", 0), _calls(results, "recompile", 1)
    for rank in range(world_size):
        assert len(first[rank]["graphs"]) == 1
        assert len(second[rank]["graphs"]) == 1
        for result in (first[rank], second[rank]):
            assert result["graphs"][0]["all_to_all"] >= 2, result["explanations"]


@pytest.mark.parametrize("index", range(2), ids=["other", "larger"])
def test_inductor_dynamic_true_matches_eager(inductor_results, index):
    _, results = inductor_results
    assert_ranks_match(_calls(results, "dynamic_true", index), f"inductor dynamic=True call {index}")
