"""`is_causal=True` self-attention: Ulysses runs it in global token order and Ring masks each step by the
global positions of its queries and keys, which keeps the causal mask exact, also for token counts the
ranks do not divide and after a recompile with dynamic sizes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.multiprocess import run_on_ranks

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


def _causal_errors(rank, world_size, mesh):
    import paracompile.backend as backend

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
    return errors, list(backend.explanations)


@pytest.mark.parametrize("world_size, mesh, expected", [
    (2, "auto", "ulysses over 2 ranks"),
    (4, "auto", "ulysses over 4 ranks"),
    (2, {"ring": 2}, "ring over 2 ranks"),
    (4, {"ulysses": 2, "ring": 2}, "ring over 2 ranks (ulysses 2 inside"),
    (4, {"ring": 4}, "ring over 4 ranks"),
], ids=["ulysses2", "ulysses4", "ring2", "ulysses2_ring2", "ring4"])
def test_causal_attention_matches_eager(world_size, mesh, expected):
    for errors, explanations in run_on_ranks(_causal_errors, world_size, mesh, timeout=600):
        assert max(errors) < 1e-4, errors
        assert all("causal" in text and expected in text for text in explanations), explanations
