"""Training through the rewrite: `loss.backward()` on a compiled, parallel model gives every rank the
gradients single-process eager gives, for every parameter and for the inputs that require grad.

A 2-rank world (gloo) runs the toy DiT under Ulysses 2 (uneven tokens, a text mask), Ring 2 and the batch
mesh, the tiny FLUX, Wan and HunyuanVideo under Ulysses 2, the tiny FLUX under Ring 2, causal self-attention, a
learned per-head attention bias and grouped-query attention under Ring 2, grouped-query attention under Ulysses 2
(uneven shards) and the learned bias under Ring 2 through Inductor (AOTAutograd differentiates the rewritten
graph, the collectives, the ring op and its backward included), and a few optimizer steps whose losses follow
single-process training; a 4-rank world runs the toy DiT under Ulysses 2 x Ring 2 and causal attention under
Ring 4 on 5 tokens (a rank with no tokens: an empty block and a padded query row). Ring meshes run ring
attention in training too (paracompile::ring_attention, ring_kernels.py): the report says so.
Each rank computes the eager reference itself (no communication) before compiling. The loss is a mean
squared error against a fixed random target, so every output element gets its own gradient.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_matches
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

pytestmark = pytest.mark.slow  # spawns a process group

UNEVEN = dict(height=10, width=14, text_length=7)  # 35 image + 7 text tokens: 2 divides neither

# name -> (model, mesh, inputs, the inputs whose gradient is compared, compiler)
SCENARIOS = {
    "toy_ulysses2": ("toy", {"ulysses": 2}, dict(UNEVEN, masked=True), ("latents", "text"), "eager"),
    "toy_ring2": ("toy", {"ring": 2}, dict(UNEVEN, masked=True), ("latents", "text"), "eager"),
    "toy_batch2": ("toy", {"batch": 2}, dict(UNEVEN, batch=2), ("latents",), "eager"),
    "flux_ulysses2": ("flux", {"ulysses": 2}, "uneven", ("hidden_states", "encoder_hidden_states"), "eager"),
    "wan_ulysses2": ("wan_t2v", {"ulysses": 2}, "uneven", ("hidden_states",), "eager"),
    "hunyuan_ulysses2": ("hunyuan_video", {"ulysses": 2}, "uneven", ("hidden_states",), "eager"),
    "flux_ring2": ("flux", {"ring": 2}, "uneven", ("hidden_states", "encoder_hidden_states"), "eager"),
    "causal_ring2": ("causal", {"ring": 2}, dict(tokens=13), ("x",), "eager"),
    "bias_ring2": ("learned_bias", {"ring": 2}, dict(tokens=37), ("x",), "eager"),
    "gqa_ring2": ("gqa", {"ring": 2}, dict(tokens=11), ("x",), "eager"),
    "bias_ring2_inductor": ("learned_bias", {"ring": 2}, dict(tokens=37), ("x",), "inductor"),
    # 11 tokens: shards of 6 and 5, so the backward's all-to-alls of dQ, dK and dV have other sizes on each rank
    # (Inductor once ordered them differently on the two: differentiable.py).
    "gqa_ulysses2_inductor": ("gqa", {"ulysses": 2}, dict(tokens=11), ("x",), "inductor"),
    "toy_ulysses2_ring2": ("toy", {"ulysses": 2, "ring": 2}, dict(UNEVEN, masked=True), ("latents",), "eager"),
    "causal_ring4": ("causal", {"ring": 4}, dict(tokens=5), ("x",), "eager"),
}
WORLD_OF = {name: 4 if name in ("toy_ulysses2_ring2", "causal_ring4") else 2 for name in SCENARIOS}


class GroupedQueryAttention(torch.nn.Module):
    """Self-attention with 4 query heads and 2 key/value heads (`enable_gqa`)."""

    def __init__(self, width=32, heads=4, key_heads=2):
        super().__init__()
        self.heads, self.key_heads = heads, key_heads
        size = width // heads
        self.q = torch.nn.Linear(width, width)
        self.kv = torch.nn.Linear(width, 2 * key_heads * size)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(x).unflatten(-1, (2, self.key_heads, -1)).permute(2, 0, 3, 1, 4)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.out(attended.transpose(1, 2).flatten(2)) + x


def _build(model_name: str, inputs_spec):
    if model_name == "toy":
        torch.manual_seed(0)
        return ToyDiT(depth=2), toy_inputs(**inputs_spec), lambda output: output
    if model_name in ("causal", "learned_bias", "gqa"):
        from tests.test_causal_attention import CausalSelfAttention
        from tests.test_overlap import PerHeadMask

        torch.manual_seed(0)
        model = {"causal": CausalSelfAttention, "learned_bias": PerHeadMask, "gqa": GroupedQueryAttention}[model_name]()
        model.requires_grad_(True)  # the bias's slopes too: the ring op gives the mask its gradient
        width = 16 if model_name == "causal" else 32
        x = torch.randn(2, inputs_spec["tokens"], width, generator=torch.Generator().manual_seed(1))
        return model, dict(x=x), lambda output: output
    from tests.tiny_models import CASES

    case = CASES[model_name]
    return case.build(), case.make_inputs(seed=0, size=inputs_spec), case.output


def _loss_and_grads(model, call, inputs: dict, grad_inputs, output_of, target=None):
    model.zero_grad(set_to_none=True)
    inputs = {name: value.detach().clone().requires_grad_(True) if name in grad_inputs else value
              for name, value in inputs.items()}
    output = output_of(call(**inputs))
    if target is None:
        target = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
    loss = ((output - target) ** 2).mean()
    loss.backward()
    return dict(loss=loss.detach(), target=target,
                parameters={name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
                inputs={name: inputs[name].grad.clone() for name in grad_inputs})


def _scenario(name):
    model_name, mesh, inputs_spec, grad_inputs, compiler = SCENARIOS[name]
    model, inputs, output_of = _build(model_name, inputs_spec)
    model.train(False)  # no dropout; gradients still flow
    expected = _loss_and_grads(model, model, inputs, grad_inputs, output_of)
    options = {"compiler": compiler, "mesh": mesh}
    if compiler == "inductor":
        options["inductor"] = {"cpp.vec_isa_ok": False}
    compiled = torch.compile(model, backend="paracompile", options=options)
    actual = _loss_and_grads(model, compiled, inputs, grad_inputs, output_of, expected["target"])
    expected.pop("target"), actual.pop("target")
    import paracompile.backend as backend

    return dict(expected=expected, actual=actual, report=backend.explanations[-1])


def _optimizer_steps(steps: int = 3):
    """A few SGD steps on the toy DiT: compiled on the mesh, and on one process, from the same weights."""
    losses = {}
    for variant in ("eager", "compiled"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = ToyDiT(depth=2)
        call = model if variant == "eager" else torch.compile(
            model, backend="paracompile", options={"compiler": "eager", "mesh": {"ulysses": 2}})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        target = None
        losses[variant] = []
        for step in range(steps):
            inputs = toy_inputs(**UNEVEN, seed=step)
            output = call(**inputs)
            if target is None:
                target = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
            loss = ((output - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[variant].append(loss.item())
    return losses


def _run(rank, world_size):
    results = {}
    for name in SCENARIOS:
        if WORLD_OF[name] == world_size:
            torch._dynamo.reset()
            results[name] = _scenario(name)
    if world_size == 2:
        results["optimizer_steps"] = _optimizer_steps()
    return results


WORLD2, WORLD4 = RanksJob(_run, 2, timeout=1200), RanksJob(_run, 4, timeout=1200)


@pytest.fixture(scope="module")
def world2():
    return WORLD2.result()


@pytest.fixture(scope="module")
def world4():
    return WORLD4.result()


@pytest.fixture
def ranks(request, name):
    return request.getfixturevalue(f"world{WORLD_OF[name]}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gradients_equal_single_process_eager(ranks, name):
    for rank, results in enumerate(ranks):
        result = results[name]
        expected, actual = result["expected"], result["actual"]
        assert_matches(actual["loss"], expected["loss"], f"{name} rank {rank} loss")
        assert sorted(actual["parameters"]) == sorted(expected["parameters"]), "the same parameters get gradients"
        for parameter, grad in expected["parameters"].items():
            assert_matches(actual["parameters"][parameter], grad, f"{name} rank {rank} d loss / d {parameter}")
        for input_name, grad in expected["inputs"].items():
            assert_matches(actual["inputs"][input_name], grad, f"{name} rank {rank} d loss / d {input_name}")
        assert "compiled to train" in result["report"], result["report"]
    # Every rank holds the same parameter gradients (not its own shard's share).
    for parameter, grad in ranks[0][name]["actual"]["parameters"].items():
        for other in ranks[1:]:
            assert torch.equal(grad, other[name]["actual"]["parameters"][parameter]), parameter
    if "ring" in name:
        # Ring attention itself, in its differentiable op: no keys and values gathered for it.
        report = ranks[0][name]["report"]
        assert "training: one differentiable op" in report and "ring_attention" in report, report
        assert "keys and values gathered" not in report, report


def test_optimizer_steps_follow_single_process_training(world2):
    for results in world2:
        losses = results["optimizer_steps"]
        assert losses["eager"][0] != losses["eager"][-1]  # the steps change the model
        for step, (got, want) in enumerate(zip(losses["compiled"], losses["eager"])):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), f"step {step}: {got} against {want}"
