"""Ring attention, Ulysses x Ring and the batch mesh dim, against single-process eager.

Every mesh of the options table on the toy DiT (2 and 4 ranks, uneven token counts, text masks, batch 2),
the twelve tiny diffusers models under Ring 2 on 2 ranks, a subset under Ulysses 2 x Ring 2 and batch 2 x
Ring 2 on 4 ranks, and Ring 2 through Inductor once. Each world size's runs share one set of spawned
ranks (a fixture per world size); results are checked per scenario.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_ranks_match, run_compiled_vs_eager, without_callables
from tests.multiprocess import RanksJob
from tests.test_diffusers_models import ATTENTION_OUTSIDE_GRAPH, LINEAR_SELF_ATTENTION, PARTIAL_SUM
from tests.toy_dit import ToyDiT, toy_inputs

pytestmark = pytest.mark.slow  # every test here spawns process groups

UNEVEN = dict(height=10, width=14, text_length=7)  # 35 image + 7 text tokens: 2 and 4 divide neither

# name -> (world size, mesh, toy inputs, what the report must say about self-attention)
TOY_SCENARIOS = {
    "ring2": (2, {"ring": 2}, dict(), "ring over 2 ranks (cpu_flash kernel"),
    "ring2_uneven_masked": (2, {"ring": 2}, dict(UNEVEN, masked=True), "with mask, uneven blocks"),
    "ring4_uneven_masked": (4, {"ring": 4}, dict(UNEVEN, masked=True), "ring over 4 ranks"),
    "ulysses2_ring2_masked": (4, {"ulysses": 2, "ring": 2}, dict(UNEVEN, masked=True), "ulysses 2 inside"),
    "batch2_ulysses2": (4, {"batch": 2, "ulysses": 2}, dict(UNEVEN, masked=True, batch=2), "ulysses over 2 ranks"),
    "batch2_ring2": (4, {"batch": 2, "ring": 2}, dict(UNEVEN, masked=True, batch=2), "ring over 2 ranks"),
    "batch2_only": (2, {"batch": 2}, dict(UNEVEN, batch=2), "batch rows split over 2 ranks"),
    # A DeviceMesh whose dims come in another order than (batch, ring, ulysses).
    "device_mesh_ulysses_ring": (4, "device_mesh", dict(UNEVEN), "ring over 2 ranks (ulysses 2 inside"),
}

# name -> (world size, mesh, models, batch)
MODEL_SCENARIOS = {
    "ring2": (2, {"ring": 2}, ["flux", "sd3", "wan_t2v", "wan_i2v", "hunyuan_video", "cogvideox", "mochi",
                               "ltx_video", "qwen_image", "pixart", "hidream", "lumina2", "sana"], 1),
    "ulysses2_ring2": (4, {"ulysses": 2, "ring": 2}, ["flux", "wan_i2v", "hunyuan_video", "qwen_image"], 1),
    "batch2_ring2": (4, {"batch": 2, "ring": 2}, ["flux", "ltx_video"], 2),
}


def _mesh(mesh, world_size):
    if mesh == "device_mesh":
        from torch.distributed.device_mesh import init_device_mesh

        # Dims (ulysses, ring): rank = ulysses_index * 2 + ring_index, so the ring groups are consecutive.
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring"))
    return mesh


def _run_world(rank, world_size):
    from tests.tiny_models import CASES

    results = {}
    for name, (scenario_world, mesh, inputs, _) in TOY_SCENARIOS.items():
        if scenario_world != world_size:
            continue
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ToyDiT().eval()
        options = {"compiler": "eager", "mesh": _mesh(mesh, world_size)}
        results[("toy", name)] = without_callables(run_compiled_vs_eager(model, toy_inputs(**inputs), options,
                                                                         record=False))
    for scenario, (scenario_world, mesh, models, batch) in MODEL_SCENARIOS.items():
        if scenario_world != world_size:
            continue
        for model_name in models:
            torch._dynamo.reset()
            case = CASES[model_name]
            result = run_compiled_vs_eager(case.build(), case.make_inputs(seed=0, size="uneven", batch=batch),
                                           {"compiler": "eager", "mesh": mesh}, case.output, record=False)
            results[(scenario, model_name)] = without_callables(result)
    if world_size == 2:
        # The rotary table multiplies first (HiDream): the pointwise rule keeps q's segments (test_plans.py).
        from tests.test_plans import TableTimesJointQueries, table_inputs

        for mesh in ({"ring": 2}, {"ulysses": 2}):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = TableTimesJointQueries(table_first=True).eval()
            results[("table_first", next(iter(mesh)))] = without_callables(
                run_compiled_vs_eager(model, table_inputs(), {"compiler": "eager", "mesh": mesh}, record=False))
        torch._dynamo.reset()
        torch.manual_seed(0)
        results[("values_split_apart", "ring")] = without_callables(run_compiled_vs_eager(
            ValuesFromOneInput().eval(), dict(table_inputs(), values=torch.randn(1, 4, 22, 8)),
            {"compiler": "eager", "mesh": {"ring": 2}}, record=False))
    torch._dynamo.reset()
    return results


class ValuesFromOneInput(torch.nn.Module):
    """Keys concatenate image and text tokens (two segments); values arrive as one input over all tokens
    (one segment). Ring sends keys and values together, so the values are re-cut to the keys' split (before,
    ring attention refused such a graph)."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.image_qk = torch.nn.Linear(width, 2 * width)
        self.text_qk = torch.nn.Linear(width, 2 * width)

    def forward(self, image, text, cos, values):
        batch, width = image.shape[0], image.shape[-1]
        qk = torch.cat([self.image_qk(image), self.text_qk(text)], dim=1)
        tokens = qk.shape[1]
        q, k = qk.view(batch, tokens, 2, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q * cos, k, values * 2)


def test_ring_recuts_values_split_apart_from_keys(world2):
    ranks = world2[("values_split_apart", "ring")]
    assert_ranks_match(ranks, "values split apart from keys, ring")
    for result in ranks:
        report = result["explanations"][-1]
        # The first rewrite re-splits the values for the ring; the pass then cuts their source with the
        # keys' segments, so no gather is left.
        assert "ring over 2 ranks" in report and "(L_values_) along dim 2 (segments ['16', '6'])" in report, report


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_rotary_table_first_matches_eager(world2, strategy):
    ranks = world2[("table_first", strategy)]
    assert_ranks_match(ranks, f"table first, {strategy}")
    for result in ranks:
        assert f"{strategy} over 2 ranks" in result["explanations"][-1], result["explanations"][-1]


WORLD2, WORLD4 = RanksJob(_run_world, 2, timeout=900), RanksJob(_run_world, 4, timeout=1200)


@pytest.fixture(scope="module")
def world2():
    return _collect(WORLD2.result())


@pytest.fixture(scope="module")
def world4():
    return _collect(WORLD4.result())


def _collect(per_rank):
    return {key: [ranks[key] for ranks in per_rank] for key in per_rank[0]}


@pytest.fixture
def results(request, world_size):
    return request.getfixturevalue(f"world{world_size}")


TOY_CASES = [(spec[0], name) for name, spec in TOY_SCENARIOS.items()]


@pytest.mark.parametrize("world_size, name", TOY_CASES, ids=[name for _, name in TOY_CASES])
def test_toy_dit(results, world_size, name):
    ranks = results[("toy", name)]
    assert_ranks_match(ranks, f"toy {name}")
    expected_text = TOY_SCENARIOS[name][3]
    for result in ranks:
        report = result["explanations"][-1]
        assert expected_text in report, report
        assert ": replicated (" not in report, report


MODEL_CASES = [(spec[0], scenario, model) for scenario, spec in MODEL_SCENARIOS.items() for model in spec[2]]


@pytest.mark.parametrize("world_size, scenario, model", MODEL_CASES,
                         ids=[f"{scenario}-{model}" for _, scenario, model in MODEL_CASES])
def test_diffusers_model(results, world_size, scenario, model):
    ranks = results[(scenario, model)]
    assert_ranks_match(ranks, f"{model} {scenario}")
    if model in ATTENTION_OUTSIDE_GRAPH:
        return
    expected = PARTIAL_SUM if model in LINEAR_SELF_ATTENTION else "ring over 2 ranks"
    for result in ranks:
        assert any(expected in text for text in result["explanations"]), result["explanations"]


# ----------------------------------------------------------------------------------------------
# Inductor, once: the toy DiT under Ring 2, with the generated code's collective order checked.


def _ring_inductor(rank, world_size):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT(depth=1).eval()
    call_inputs = toy_inputs(**UNEVEN)
    with torch.no_grad():
        expected = model(**call_inputs)
        compiled = torch.compile(model, backend="paracompile", options={
            "compiler": "inductor", "mesh": {"ring": 2}, "inductor": {"cpp.vec_isa_ok": False}})
        output, codes = run_and_get_code(lambda: compiled(**call_inputs))
    torch._dynamo.reset()
    return dict(error=None, expected=expected, output=output, code="\n".join(codes))


RING_INDUCTOR = RanksJob(_ring_inductor, 2, timeout=900)


def test_ring2_through_inductor_overlaps_transfer_with_attention():
    ranks = RING_INDUCTOR.result()
    assert_ranks_match(ranks, "toy ring2 inductor")
    for result in ranks:
        lines = result["code"].splitlines()
        calls = [("send" if "all_to_all_single.default(" in line else "wait" if "wait_tensor.default(" in line
                  else "attend") for line in lines
                 if "_c10d_functional.all_to_all_single.default(" in line or "wait_tensor.default(" in line
                 or "flash_attention_for_cpu.default(" in line]
        # Per ring attention over 2 ranks: send the block on, attend to the local one, wait, attend.
        assert calls and calls.count("send") >= 1, calls
        first_send = calls.index("send")
        assert calls[first_send:first_send + 4] == ["send", "attend", "wait", "attend"], calls
