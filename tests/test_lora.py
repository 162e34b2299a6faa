"""LoRA adapters (diffusers + PEFT) on a compiled, parallel transformer, against the eager model with the same
adapter.

One 2-rank world (gloo, `compiler="eager"`) runs the tiny FLUX under Ulysses 2 and Ring 2: an adapter
loaded with `load_lora_adapter`; the same adapter fused into the weights (`fuse_lora`) and unfused again;
and a hot swap (`enable_lora_hotswap` before the first load, then `load_lora_adapter(..., hotswap=True)`)
to an adapter of a lower rank, which must not recompile (counted by the backend's reports: one per compile).
The reference is a second, eager copy of the model that holds both adapters and switches between them
with `set_adapters`, so it never runs paracompile's code or shares its weights.
"""
from __future__ import annotations

import pytest
import torch

import paracompile.backend as backend
from tests.conftest import assert_matches
from tests.multiprocess import RanksJob

pytestmark = pytest.mark.slow  # spawns a process group

TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
MESHES = {"ulysses2": {"ulysses": 2}, "ring2": {"ring": 2}}


def lora_state_dict(model: torch.nn.Module, rank: int, seed: int) -> dict:
    """A random LoRA in diffusers' format (`<module>.lora_A.weight`, `<module>.lora_B.weight`) for every
    attention projection; large enough to change the output visibly."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(TARGETS):
            state[f"{name}.lora_A.weight"] = 0.1 * torch.randn(rank, module.in_features, generator=generator)
            state[f"{name}.lora_B.weight"] = 0.1 * torch.randn(module.out_features, rank, generator=generator)
    return state


def _run(rank, world_size):
    from tests.tiny_models import CASES

    case = CASES["flux"]
    inputs = case.make_inputs(seed=0, size="uneven")
    results = {}
    for mesh_name, mesh in MESHES.items():
        torch._dynamo.reset()
        model, reference = case.build(), case.build()
        first, second = lora_state_dict(model, 4, seed=1), lora_state_dict(model, 2, seed=2)
        reference.load_lora_adapter(dict(first), adapter_name="first", prefix=None)
        reference.load_lora_adapter(dict(second), adapter_name="second", prefix=None)
        model.enable_lora_hotswap(target_rank=4)
        model.load_lora_adapter(dict(first), adapter_name="default_0", prefix=None)
        compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "mesh": mesh})
        outputs = {}
        with torch.no_grad():
            reference.set_adapters("first")
            outputs["first"] = (case.output(compiled(**inputs)), case.output(reference(**inputs)))
            compiles_before = len(backend.explanations)
            model.load_lora_adapter(dict(second), adapter_name="default_0", hotswap=True, prefix=None)
            reference.set_adapters("second")
            outputs["hot_swapped"] = (case.output(compiled(**inputs)), case.output(reference(**inputs)))
            swap_compiles = len(backend.explanations) - compiles_before
            model.fuse_lora()
            outputs["fused"] = (case.output(compiled(**inputs)), case.output(reference(**inputs)))
            model.unfuse_lora()
            outputs["unfused"] = (case.output(compiled(**inputs)), case.output(reference(**inputs)))
            reference.disable_lora()
            without = case.output(reference(**inputs))
        results[mesh_name] = dict(outputs=outputs, swap_compiles=swap_compiles, without=without,
                                  report=backend.explanations[compiles_before - 1])
    return results


WORLD2 = RanksJob(_run, 2, timeout=900)


@pytest.fixture(scope="module")
def world2():
    return WORLD2.result()


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("stage", ["first", "hot_swapped", "fused", "unfused"])
def test_lora_matches_the_eager_model_with_the_same_adapter(world2, mesh, stage):
    for rank, results in enumerate(world2):
        actual, expected = results[mesh]["outputs"][stage]
        assert_matches(actual, expected, f"{stage}, {mesh}, rank {rank}")
        # The adapter matters: without it the output is far from this one.
        assert (expected - results[mesh]["without"]).abs().max() > 1e-2


@pytest.mark.parametrize("mesh", list(MESHES))
def test_hot_swap_does_not_recompile_and_the_graph_stays_parallel(world2, mesh):
    for results in world2:
        assert results[mesh]["swap_compiles"] == 0
        assert f"{'ulysses' if mesh.startswith('ulysses') else 'ring'} over 2 ranks" in results[mesh]["report"]
