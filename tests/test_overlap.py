"""Ulysses with its heads in chunks (`ulysses_chunks`): every chunk's exchange is issued before the
attention it should overlap; plain Ulysses runs independent matrix products under its exchanges. Outputs against single-process eager on 2 ranks (even, uneven, masked, a
per-head mask), the report line, and, through Inductor, the order of collectives and attention kernels in
the generated code: an exchange is in flight while an attention kernel runs.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paracompile.backend as backend
from tests.conftest import assert_matches
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

pytestmark = pytest.mark.slow  # every test here spawns process groups


class PerHeadMask(nn.Module):
    """Self-attention with a float mask that differs per head (ALiBi-like), so each chunk needs its heads'."""

    def __init__(self, width=32, heads=8):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.slopes = nn.Parameter(torch.linspace(0.1, 1.0, heads), requires_grad=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        positions = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
        bias = -(positions[None, :] - positions[:, None]).abs() * self.slopes[:, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None]).transpose(1, 2).flatten(2)


class ParallelBlock(nn.Module):
    """A FLUX single block: the MLP branch and attention read the same normalised input, and one projection
    reads both. The MLP's input projection does not depend on the exchanges, so it can run under one."""

    def __init__(self, width=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(5 * width, width)

    def forward(self, x):
        h = self.norm(x)
        mlp = F.gelu(self.mlp_in(h), approximate="tanh")
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return x + self.out(torch.cat([attended, mlp], dim=-1))


SCENARIOS = {
    "toy_4heads": lambda: (ToyDiT().eval(), toy_inputs(), 2),
    "toy_8heads_masked": lambda: (ToyDiT(width=64, heads=8).eval(), toy_inputs(masked=True), 2),
    "toy_8heads_uneven_4chunks": lambda: (ToyDiT(width=64, heads=8).eval(),
                                          toy_inputs(height=10, width=14, text_length=7), 4),
    "per_head_mask": lambda: (PerHeadMask().eval(), dict(x=torch.randn(1, 37, 32)), 2),
    "heads_do_not_split": lambda: (ToyDiT().eval(), toy_inputs(), 4),  # 2 heads per rank, 4 chunks: plain
}


def _scenarios(rank, world_size):
    results = {}
    for name, make in SCENARIOS.items():
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, inputs, chunks = make()
        try:
            with torch.no_grad():
                expected = model(**inputs)
                backend.explanations.clear()
                output = torch.compile(model, backend="paracompile", options={
                    "compiler": "eager", "mesh": {"ulysses": 2}, "ulysses_chunks": chunks})(**inputs)
            results[name] = dict(error=None, output=output, expected=expected, report=backend.explanations[-1])
        except Exception:
            results[name] = dict(error=traceback.format_exc())
    torch._dynamo.reset()
    try:
        from torch._inductor.utils import run_and_get_code

        torch.manual_seed(0)
        model = ToyDiT(depth=1).eval()
        inputs = toy_inputs()
        with torch.no_grad():
            expected = model(**inputs)
            compiled = torch.compile(model, backend="paracompile", options={
                "mesh": {"ulysses": 2}, "ulysses_chunks": 2, "inductor": {"cpp.vec_isa_ok": False}})
            output, codes = run_and_get_code(lambda: compiled(**inputs))
        results["inductor"] = dict(error=None, output=output, expected=expected, code="\n".join(codes))
    except Exception:
        results["inductor"] = dict(error=traceback.format_exc())
    torch._dynamo.reset()
    try:
        from torch._inductor.utils import run_and_get_code

        torch.manual_seed(0)
        model = ParallelBlock().eval()
        x = torch.randn(1, 64, 32)
        with torch.no_grad():
            expected = model(x)
            compiled = torch.compile(model, backend="paracompile", options={
                "mesh": {"ulysses": 2}, "inductor": {"cpp.vec_isa_ok": False}})
            output, codes = run_and_get_code(lambda: compiled(x))
        results["parallel_block"] = dict(error=None, output=output, expected=expected, code="\n".join(codes),
                                         report=backend.explanations[-1])
    except Exception:
        results["parallel_block"] = dict(error=traceback.format_exc())
    torch._dynamo.reset()
    return results


TWO_RANKS = RanksJob(_scenarios, 2, timeout=900)


@pytest.fixture(scope="module")
def ranks():
    return TWO_RANKS.result()


@pytest.mark.parametrize("name", list(SCENARIOS) + ["inductor", "parallel_block"])
def test_chunked_ulysses_matches_eager(ranks, name):
    for rank, results in enumerate(ranks):
        result = results[name]
        assert result["error"] is None, result["error"]
        assert_matches(result["output"], result["expected"], f"rank {rank} {name}")


@pytest.mark.parametrize("name, chunks", [("toy_4heads", 2), ("toy_8heads_masked", 2),
                                          ("toy_8heads_uneven_4chunks", 4), ("per_head_mask", 2)])
def test_report_names_the_chunks(ranks, name, chunks):
    report = ranks[0][name]["report"]
    assert f"{chunks} head chunks, each one's exchange overlapping another's attention" in report, report


def test_chunks_that_do_not_divide_the_heads_fall_back_to_one_exchange(ranks):
    report = ranks[0]["heads_do_not_split"]["report"]
    assert "ulysses over 2 ranks" in report and "head chunks" not in report, report


def test_generated_code_overlaps_an_exchange_with_attention(ranks):
    for result in ranks:
        assert result["inductor"]["error"] is None, result["inductor"]["error"]
        lines = result["inductor"]["code"].splitlines()
        calls = [("send" if "all_to_all_single.default(" in line else "wait" if "wait_tensor.default(" in line
                  else "attend") for line in lines
                 if "_c10d_functional.all_to_all_single.default(" in line or "wait_tensor.default(" in line
                 or "flash_attention_for_cpu.default(" in line]
        attends = [i for i, call in enumerate(calls) if call == "attend"]
        assert attends, calls
        # Some exchange was issued and not yet waited for while each chunked self-attention ran: the first
        # block's joint attention runs in 2 chunks, so its first attention kernel has the second chunk's
        # inputs in flight.
        first = attends[0]
        assert calls[:first].count("send") > calls[:first].count("wait"), calls


def test_generated_code_runs_a_matrix_product_under_a_ulysses_exchange(ranks):
    """Plain Ulysses (one exchange per tensor, no chunks): Inductor's compute/communication reordering is on
    for Ulysses graphs, so a matrix product that does not depend on an exchange runs while it is in flight.
    Without it, every exchange is waited for right after it is issued. On CPU Inductor estimates every op's
    runtime as zero, so what places the product here is the wait sunk to its first use; the pass that moves
    compute by estimated cost (`reorder_compute_for_overlap`) acts on GPU estimates."""
    for result in ranks:
        parallel = result["parallel_block"]
        assert parallel["error"] is None, parallel["error"]
        in_flight, overlapped = 0, []
        for line in parallel["code"].splitlines():
            if "_c10d_functional.all_to_all_single.default(" in line:
                in_flight += 1
            elif "_c10d_functional.wait_tensor.default(" in line and in_flight:
                in_flight -= 1
            elif "extern_kernels.addmm(" in line or "extern_kernels.mm(" in line:
                overlapped.append(in_flight > 0)
        assert any(overlapped), overlapped


def test_the_report_names_the_reordering(ranks):
    report = ranks[0]["parallel_block"]["report"]
    assert ("Inductor: compute/communication reordering (reorder_compute_for_overlap, sink_waits, raise_comms); "
            "collectives keep their graph order") in report, report
