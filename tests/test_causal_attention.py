"""`is_causal=True` self-attention: Ulysses runs it in global token order and Ring masks each step by the
global positions of its queries and keys, which keeps the causal mask exact, also for token counts the
ranks do not divide and after a recompile with dynamic sizes. The same in a graph compiled to train
(Ring's differentiable op, ring_kernels.py): the gradients of the weights and of the input equal eager's."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.multiprocess import RanksJob

pytestmark = pytest.mark.slow  # every test here spawns process groups


class CausalSelfAttention(nn.Module):
    def __init__(self, width=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.out(attended) + x


def _causal_errors(rank, world_size, meshes):
    import paracompile.backend as backend

    results = {}
    for name, mesh in meshes.items():
        torch._dynamo.reset()
        backend.explanations.clear()
        torch.manual_seed(0)
        model = CausalSelfAttention().eval()
        compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "mesh": mesh})
        errors = []
        # 5 tokens over 4 ranks: chunks of 2, 2, 1 and 0, so one rank holds no queries and no keys; after
        # the recompile at 13 tokens the sizes are symbolic.
        for tokens in (12, 13, 5):
            x = torch.randn(2, tokens, 16)
            with torch.no_grad():
                errors.append((compiled(x) - model(x)).abs().max().item())
        results[name] = (errors, list(backend.explanations))

        # Trained: the same sizes (symbolic after the recompile), gradients against eager's.
        torch._dynamo.reset()
        backend.explanations.clear()
        compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "mesh": mesh})
        grad_errors = []
        for tokens in (12, 13, 5):
            x = torch.randn(2, tokens, 16)
            grads = []
            for call in (model, compiled):
                model.zero_grad(set_to_none=True)
                leaf = x.clone().requires_grad_(True)
                (call(leaf) ** 2).mean().backward()
                grads.append([leaf.grad] + [p.grad for p in model.parameters()])
            grad_errors.append(max((a - b).abs().max().item() for a, b in zip(*grads)))
        results[f"{name} trained"] = (grad_errors, list(backend.explanations))
    return results


# name -> (world size, mesh, what the report says)
MESHES = {
    "ulysses2": (2, "auto", "ulysses over 2 ranks"),
    "ulysses4": (4, "auto", "ulysses over 4 ranks"),
    "ring2": (2, {"ring": 2}, "ring over 2 ranks"),
    "ulysses2_ring2": (4, {"ulysses": 2, "ring": 2}, "ring over 2 ranks (ulysses 2 inside"),
    "ring4": (4, {"ring": 4}, "ring over 4 ranks"),
}
WORLDS = [RanksJob(_causal_errors, world_size,
                   {name: mesh for name, (size, mesh, _) in MESHES.items() if size == world_size}, timeout=600)
          for world_size in (2, 4)]


@pytest.fixture(scope="module")
def worlds():
    """One world per world size runs all of its meshes."""
    results = {}
    for job in WORLDS:
        for rank_results in job.result():
            for name, result in rank_results.items():
                results.setdefault(name, []).append(result)
    return results


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("name", list(MESHES))
def test_causal_attention_matches_eager(worlds, name, trained):
    expected = MESHES[name][2]
    for errors, explanations in worlds[f"{name} trained" if trained else name]:
        assert max(errors) < 1e-4, errors
        assert explanations and all("causal" in text and expected in text for text in explanations), explanations
        if trained:
            assert all("compiled to train" in text for text in explanations), explanations
            if "ring" in name:
                assert all("training: one differentiable op" in text for text in explanations), explanations
