"""The toy DiT (tests/toy_dit.py) under paracompile on 2 and 4 ranks, compared with eager.

All scenarios of one world size run inside one `run_on_ranks` call (spawning ranks costs seconds);
each scenario is then its own test. The compiler is "eager" (the rewritten graph runs as is), so an
`AttentionRecorder` can see the local attention calls; Inductor is covered by tests/test_dynamic_shapes.py
(2 ranks), tests/test_diffusers_models.py (FLUX, 2 ranks) and the world-size-1 test here.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import (assert_attention_split, assert_matches, assert_ranks_match,
                            report_sections, run_compiled_vs_eager, without_callables)
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

UNEVEN = dict(height=10, width=14)  # 5x7 = 35 image tokens: divisible by neither 2 nor 4
SCALAR_CPP = {"cpp.vec_isa_ok": False}

# name -> how to build the model, its inputs and the options. "expect": "ulysses" when every
# self-attention must run with Ulysses, "ring" when mesh="auto" must pick Ring.
SCENARIOS = {
    "default": dict(),
    "uneven_text6": dict(inputs=dict(UNEVEN, text_length=6)),  # 35 + 6 = 41 tokens
    "uneven_text7": dict(inputs=dict(UNEVEN, text_length=7)),  # 35 + 7 = 42 tokens
    "non_square": dict(inputs=dict(height=8, width=12)),
    "text_mask": dict(inputs=dict(masked=True)),
    "text_mask_uneven": dict(inputs=dict(UNEVEN, text_length=7, masked=True)),
    "batch2_uneven": dict(inputs=dict(UNEVEN, text_length=7, batch=2)),
    "explicit_mesh": dict(options=dict(mesh="explicit")),  # {"ulysses": world_size}
    "device_mesh": dict(options=dict(mesh="device_mesh")),  # DeviceMesh with one "ulysses" dim
    "eight_heads": dict(model=dict(width=64, heads=8)),  # 4 or 2 heads per rank
    # 3 heads: neither 2 nor 4 divides them, so mesh="auto" picks Ring over all ranks.
    "three_heads_auto": dict(model=dict(width=24, heads=3), expect="ring"),
}


def _options(spec, world_size, compiler):
    options = {"compiler": compiler}
    mesh = spec.get("options", {}).get("mesh")
    if mesh == "explicit":
        options["mesh"] = {"ulysses": world_size}
    elif mesh == "device_mesh":
        from torch.distributed.device_mesh import init_device_mesh

        options["mesh"] = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ulysses",))
    return options


def _run_scenarios(rank, world_size, names, compiler="eager"):
    results = {}
    for name in names:
        spec = SCENARIOS[name]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ToyDiT(**spec.get("model", {})).eval()
        call_inputs = toy_inputs(**spec.get("inputs", {}))
        result = run_compiled_vs_eager(model, call_inputs, _options(spec, world_size, compiler),
                                       record=(compiler == "eager"))
        results[name] = without_callables(result)
    return results


# 4 ranks on 2 cores compile at half speed: on 4 ranks, skip the scenarios that are no harder there.
TWO_RANKS_ONLY = {"default", "non_square", "uneven_text6", "text_mask", "explicit_mesh"}
WORLD_SIZES = (2, 4)


def _names(world_size, expect=None):
    return [name for name, spec in SCENARIOS.items()
            if (world_size == 2 or name not in TWO_RANKS_ONLY) and expect in (None, spec.get("expect", "ulysses"))]


def _cases(expect=None):
    """(world size, scenario) pairs, for parametrizing `world_size` and `name`."""
    pairs = [(world_size, name) for world_size in WORLD_SIZES for name in _names(world_size, expect)]
    return dict(argnames="world_size, name", argvalues=pairs,
                ids=[f"ws{world_size}-{name}" for world_size, name in pairs])


WORLDS = {world_size: RanksJob(_run_scenarios, world_size, _names(world_size), timeout=600) for world_size in WORLD_SIZES}


def _run_world(world_size):
    """Every scenario of one world size in one run_on_ranks call: {scenario: [result per rank]}."""
    per_rank = WORLDS[world_size].result()
    return {name: [ranks[name] for ranks in per_rank] for name in _names(world_size)}


# One module-scoped fixture per world size, looked up by name, so that each runs once however
# pytest orders the tests.
@pytest.fixture(scope="module")
def toy_ws2():
    return _run_world(2)


@pytest.fixture(scope="module")
def toy_ws4():
    return _run_world(4)


def _results(request, world_size):
    return request.getfixturevalue(f"toy_ws{world_size}")


@pytest.mark.slow
@pytest.mark.parametrize(**_cases())
def test_output_matches_eager(request, world_size, name):
    assert_ranks_match(_results(request, world_size)[name], name)


@pytest.mark.slow
@pytest.mark.parametrize(**_cases(expect="ulysses"))
def test_self_attention_uses_ulysses(request, world_size, name):
    for rank, result in enumerate(_results(request, world_size)[name]):
        assert result["error"] is None, result["error"]
        assert len(result["graphs"]) == 1, f"rank {rank}: expected one rewritten graph, got {len(result['graphs'])}"
        # ToyDiT: one joint self-attention per block (2 blocks), each needs >= 2 all-to-alls.
        assert result["graphs"][0]["all_to_all"] >= 4, result["explanations"]
        report = result["explanations"][0]
        attention_lines = report_sections(report)["attention"]
        assert len(attention_lines) == 3, report  # 2 joint self-attentions, 1 cross-attention
        assert not any("replicated" in line for line in attention_lines), report
        assert sum(f"ulysses over {world_size} ranks" in line for line in attention_lines) >= 2, report


@pytest.mark.slow
@pytest.mark.parametrize(**_cases(expect="ulysses"))
def test_attention_runs_on_a_fraction_of_the_work(request, world_size, name):
    for result in _results(request, world_size)[name]:
        assert result["error"] is None, result["error"]
        assert_attention_split(result["eager_calls"], result["local_calls"], world_size)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda ws: f"ws{ws}")
def test_head_count_not_divisible_picks_ring_with_auto(request, world_size):
    for rank, result in enumerate(_results(request, world_size)["three_heads_auto"]):
        assert result["error"] is None, result["error"]
        report = result["explanations"][0]
        assert f"ring {world_size}, ulysses 1 (auto: Ulysses 1 is the largest divisor" in report, report
        attention_lines = report_sections(report)["attention"]
        assert len(attention_lines) == 3 and all(f"ring over {world_size} ranks" in line
                                                 for line in attention_lines), report
        # Every kernel call ran on this rank's queries against one block of keys, never on all tokens.
        full = max(c["queries"] for c in result["eager_calls"])
        assert result["local_calls"] and all(c["queries"] < full and c["keys"] < full
                                             for c in result["local_calls"]), result["local_calls"]


# ----------------------------------------------------------------------------------------------
# World size 1: no process group, paracompile is plain Inductor.


@pytest.mark.slow
def test_world_size_one_inductor_matches_eager_with_exact_gradients():
    """No mesh: paracompile is plain Inductor (AOTAutograd), nothing is rewritten, and the output and the
    gradients are eager's."""
    import paracompile.backend as backend
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT(depth=1).eval()  # one block: Inductor compiles take tens of seconds on CPU
    call_inputs = toy_inputs(**UNEVEN, text_length=7)
    expected = model(**call_inputs)
    expected.square().mean().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    backend.rewritten_graphs.clear()
    try:
        # Default compiler: Inductor. Scalar C++ kernels (no vectorisation) compile ~30% faster
        # on CPU; the paracompile path is the same.
        compiled = torch.compile(model, backend="paracompile", options={"inductor": SCALAR_CPP})
        output = compiled(**call_inputs)
        output.square().mean().backward()
    finally:
        torch._dynamo.reset()
    assert_matches(output.detach(), expected.detach(), "world size 1, inductor")
    for name, p in model.named_parameters():
        assert_matches(p.grad, expected_grads[name], f"world size 1, inductor: gradient of {name}")
    assert len(backend.rewritten_graphs) == 0  # nothing to rewrite on one rank


def test_world_size_one_eager_compiler_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT().eval()
    call_inputs = toy_inputs(masked=True)
    try:
        with torch.no_grad():
            expected = model(**call_inputs)
            output = torch.compile(model, backend="paracompile", options={"compiler": "eager"})(**call_inputs)
    finally:
        torch._dynamo.reset()
    assert_matches(output, expected, "world size 1, eager compiler")
