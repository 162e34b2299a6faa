"""The 10 tiny diffusers transformers (tests/tiny_models.py), called as their pipelines call them.

One `run_on_ranks` call per world size runs every model inside the ranks (spawning processes and
importing diffusers costs seconds, so it is done once per world size); the tests then look at the
per-model results, so each model still shows as its own test.

Sizes are "uneven": 5x7 image tokens (video: 3 frames of 5x7) and 6 text tokens, so neither the
image tokens nor image + text divide by 2 or 4 ranks. World size 4 also uses batch 2 (the CFG
batch: prompts of different lengths, so the text masks differ per row).

Mochi: its main attention (MochiAttnProcessor2_0) loops over the batch with data-dependent masking,
which breaks Dynamo's graph, so the self-attention runs eagerly outside paracompile's graph and is
not parallelised; only the caption attention pool is in the graph. For Mochi only correctness is
checked.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import (assert_attention_split, assert_ranks_match, run_compiled_vs_eager,
                            without_callables)
from tests.multiprocess import run_on_ranks

MODEL_NAMES = ["flux", "sd3", "wan_t2v", "wan_i2v", "hunyuan_video", "cogvideox", "mochi", "ltx_video",
               "qwen_image", "pixart"]
# Self-attention outside Dynamo's graph (see the module docstring): correctness only.
ATTENTION_OUTSIDE_GRAPH = {"mochi"}

SCENARIOS = {
    2: dict(size="uneven", batch=1),
    4: dict(size="uneven", batch=2),
}


def _run_models(rank, world_size, names, size, batch, options):
    from tests.tiny_models import CASES

    results = {}
    for name in names:
        torch._dynamo.reset()
        case = CASES[name]
        model = case.build()
        call_inputs = case.make_inputs(seed=0, size=size, batch=batch)
        result = run_compiled_vs_eager(model, call_inputs, options, case.output,
                                       record=(options["compiler"] == "eager"))
        results[name] = without_callables(result)
    return results


@pytest.fixture(scope="module", params=sorted(SCENARIOS), ids=lambda ws: f"ws{ws}")
def eager_results(request):
    world_size = request.param
    scenario = SCENARIOS[world_size]
    per_rank = run_on_ranks(_run_models, world_size, MODEL_NAMES, scenario["size"], scenario["batch"],
                            {"compiler": "eager"}, timeout=900)
    return world_size, {name: [ranks[name] for ranks in per_rank] for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_matches_eager(eager_results, name):
    _, results = eager_results
    assert_ranks_match(results[name], name)


def _self_attention_calls(calls):
    """Eager attention calls whose queries and keys have the same length: self or joint attention."""
    return [call for call in calls if call["queries"] == call["keys"]]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_graph_uses_ulysses_all_to_all(eager_results, name):
    if name in ATTENTION_OUTSIDE_GRAPH:
        pytest.skip(f"{name}: self-attention is outside Dynamo's graph (graph break); correctness only")
    world_size, results = eager_results
    for rank, result in enumerate(results[name]):
        assert result["error"] is None, result["error"]
        assert result["graphs"], f"rank {rank}: paracompile rewrote no graph (explanations: {result['explanations']})"
        all_to_all = sum(graph["all_to_all"] for graph in result["graphs"])
        self_attention = len(_self_attention_calls(result["eager_calls"]))
        assert self_attention > 0
        # Ulysses needs at least one all-to-all into attention and one out of it per self-attention.
        assert all_to_all >= 2 * self_attention, (
            f"rank {rank}: {all_to_all} all-to-alls for {self_attention} self-attentions\n"
            + "\n".join(result["explanations"]))
        assert any(f"ulysses over {world_size} ranks" in text for text in result["explanations"])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_attention_runs_on_a_fraction_of_the_work(eager_results, name):
    if name in ATTENTION_OUTSIDE_GRAPH:
        pytest.skip(f"{name}: self-attention is outside Dynamo's graph (graph break); correctness only")
    world_size, results = eager_results
    for rank, result in enumerate(results[name]):
        assert result["error"] is None, result["error"]
        assert_attention_split(result["eager_calls"], result["local_calls"], world_size)


# ----------------------------------------------------------------------------------------------
# Inductor, once: FLUX on 2 ranks (Inductor compiles take tens of seconds on CPU).


@pytest.fixture(scope="module")
def flux_inductor_results():
    # mode and inductor are passed through to Inductor; these values change nothing but exercise the path.
    options = {"compiler": "inductor", "mode": "default", "inductor": {"freezing": False}}
    per_rank = run_on_ranks(_run_models, 2, ["flux"], "uneven", 1, options, timeout=900)
    return [ranks["flux"] for ranks in per_rank]


def test_flux_inductor_matches_eager(flux_inductor_results):
    assert_ranks_match(flux_inductor_results, "flux (inductor)")


def test_flux_inductor_graph_uses_ulysses(flux_inductor_results):
    for result in flux_inductor_results:
        assert result["error"] is None, result["error"]
        assert sum(graph["all_to_all"] for graph in result["graphs"]) > 0
