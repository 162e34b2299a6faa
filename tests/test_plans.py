"""The sharding plan of whole models, in one process (the fast tier): the backend rewrites each tiny model's
graph as rank 0 of a fake 2-rank world (torch's fake process group: collectives keep their shapes and move
nothing, so outputs are not checked here; the multi-process tests check them against eager). What is
checked is the plan the report states: every attention runs sharded, no attention falls back to replicated,
and the only gathers are the model's own exits (an unpatchify, the graph output, a reduction over tokens, a
write the shards cannot follow), as many as the model needs. A broken token rule shows up here as an extra
gather or a replicated attention."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import paracompile.backend as backend
from paracompile.passes import sharding_rules
from tests import tiny_models
from tests.toy_dit import ToyDiT, toy_inputs

aten = torch.ops.aten

EXIT_REASONS = ("graph output", "it splits or merges the token axis with other dims", "it reduces over the token axis",
                "writes in place into it through a view the shards cannot follow")

# model -> (attentions, gathers) its plan has on 2 ranks
PLANS = {
    "toy": (3, 1),
    "flux": (3, 1),
    "sd3": (3, 1),
    "wan_t2v": (4, 1),
    "hunyuan_video": (4, 3),
    "qwen_image": (2, 1),
}


@pytest.fixture(scope="module")
def fake_rank0():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()
    torch._dynamo.reset()


def _model(name):
    torch.manual_seed(0)
    if name == "toy":
        return ToyDiT().eval(), toy_inputs()
    case = tiny_models.CASES[name]
    return case.build(), case.make_inputs()


def plan_of(name: str, mesh: dict) -> dict:
    """The report's sections for `name` compiled on `mesh`: {"attention": [...], "gathered": [...], ...}."""
    model, inputs = _model(name)
    torch._dynamo.reset()
    backend.explanations.clear()
    with torch.no_grad():
        torch.compile(model, backend="paracompile",
                      options={"compiler": "eager", "mesh": mesh, "check_inputs": "off"})(**inputs)
    sections, current = {}, None
    for line in backend.explanations[-1].splitlines()[1:]:
        if not line.startswith("    - "):
            current = line.strip().split(":")[0].split(" ")[0]
            sections[current] = []
        else:
            sections[current].append(line[len("    - "):])
    return sections


@pytest.mark.parametrize("name, mesh", [(name, {"ulysses": 2}) for name in PLANS]
                         + [("flux", {"ring": 2}), ("wan_t2v", {"ring": 2})])
def test_every_attention_is_sharded_and_the_only_gathers_are_exits(fake_rank0, name, mesh):
    attentions, gathers = PLANS[name]
    plan = plan_of(name, mesh)
    strategy = "ulysses over 2 ranks" if "ulysses" in mesh else "ring over 2 ranks"
    assert len(plan["attention"]) == attentions, plan["attention"]
    for line in plan["attention"]:
        assert strategy in line or "local (keys/values replicated" in line, line
    assert len(plan.get("gathered", [])) == gathers, plan.get("gathered")
    for line in plan.get("gathered", []):
        assert any(reason in line for reason in EXIT_REASONS), line


def test_a_broken_rule_shows_in_the_plan(fake_rank0, monkeypatch):
    """The check above catches a rule that stops following the token axis: with `add` declining, FLUX's
    residual additions gather their inputs."""
    declines = lambda view: None  # noqa: E731
    for overload in sharding_rules.overloads(aten.add):
        monkeypatch.setattr(sharding_rules.REGISTRY[overload], "rule", declines)
    plan = plan_of("flux", {"ulysses": 2})
    assert len(plan.get("gathered", [])) > PLANS["flux"][1], plan.get("gathered")
