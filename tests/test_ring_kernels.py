"""The differentiable ring attention op (paracompile/ring_kernels.py) in one process, against autograd through
SDPA on the full tensors: every rank's output, and the gradients of its queries and of its own key/value
block. The ranks are threads, and the op's transfer to the next ring rank is replaced by a hand-over between
them (the real one, an all_to_all_single, runs in the multi-process tests: tests/test_training.py). Blocks
of unequal length padded to the longest, a block with no tokens, a rank with no queries (one padding row),
masks with rows that see nothing in some block, a causal mask, a learned bias (a mask that requires grad:
its per-rank gradients are partials that sum to eager's), both CPU kernels (flash and the fp32 math path),
and fp32 and bf16.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from paracompile import ring_kernels
from tests.conftest import assert_matches

OP = torch.ops.paracompile.ring_attention


class ThreadRing:
    """Stands in for the op's all_to_all_single: every rank (a thread) hands its tensors to the next."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self.slots = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=60)

    def shift(self, tensors, rank, ranks, group_name):
        self.slots[rank] = [t.clone() for t in tensors]
        self.barrier.wait()
        received = self.slots[(rank - 1) % ranks]
        self.barrier.wait()
        return received, None

    @staticmethod
    def finish(pending):
        return tuple(pending[0])


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))


def _ring_case(lengths, queries, mask_kind, kernel, dtype, monkeypatch):
    """Each rank's (output, dQ, dK, dV) from the op, and the same slices of eager SDPA's."""
    ranks = len(lengths)
    torch.manual_seed(0)
    batch, heads, size = 2, 3, 8
    total = sum(lengths)
    q, k, v = (torch.randn(batch, heads, total, size, dtype=dtype) for _ in range(3))
    grad = torch.randn(batch, heads, total, size, dtype=dtype)
    allowed = None
    if mask_kind == "keys":  # a per-key mask: query rows that see no key of some block
        allowed = torch.rand(batch, 1, 1, total) > 0.4
        allowed[..., 0] = True  # every row sees some key
        allowed = allowed.expand(batch, 1, total, total).clone()
        allowed[:, :, 1, 1:] = False  # row 1 sees key 0 only: nothing in every other block
    elif mask_kind == "causal":
        allowed = torch.ones(total, total, dtype=torch.bool).tril()[None, None]
    bias = torch.randn(1, heads, total, total, dtype=dtype) if mask_kind == "bias" else None  # a learned bias

    full = [t.clone().float().requires_grad_(True) for t in (q, k, v)]
    full_bias = bias.float().clone().requires_grad_(True) if bias is not None else None
    expected = F.scaled_dot_product_attention(*full, attn_mask=allowed if bias is None else full_bias)
    expected.backward(grad.float())

    starts = [sum(lengths[:j]) for j in range(ranks)]
    longest = max(lengths)
    ring = ThreadRing(ranks)
    monkeypatch.setattr(ring_kernels, "_shift", ring.shift)
    monkeypatch.setattr(ring_kernels, "_finish", ring.finish)
    results, errors = [None] * ranks, []

    def rank_main(rank):
        try:
            torch.set_num_threads(1)
            torch.set_default_device(q.device)  # per thread: benchmarks/ring_backward_check.py runs this on CUDA
            # The rank's queries are its own tokens (one padding row where it has none), its block padded to
            # the longest: as ring_attention.py builds them in the graph.
            own = slice(starts[rank], starts[rank] + lengths[rank])
            query_rows = own if queries == "own" else slice(sum(queries[:rank]), sum(queries[:rank + 1]))
            rows = max(query_rows.stop - query_rows.start, 1)
            query = F.pad(q[:, :, query_rows], (0, 0, 0, rows - (query_rows.stop - query_rows.start)))
            query.requires_grad_(True)
            key, value = (F.pad(t[:, :, own], (0, 0, 0, longest - lengths[rank])).requires_grad_(True) for t in (k, v))
            masks = []
            rank_bias = bias.clone().requires_grad_(True) if bias is not None else None  # a rank's replica
            if bias is not None:
                for step in range(ranks):
                    source = (rank - step) % ranks
                    columns = rank_bias[..., query_rows, starts[source]:starts[source] + lengths[source]]
                    masks.append(F.pad(columns, (0, 0, 0, rows - columns.shape[-2])))
            query_positions, key_positions = None, []
            if mask_kind == "causal":  # positions: the op builds each step's mask
                query_positions = F.pad(torch.arange(total)[query_rows], (0, rows - (query_rows.stop - query_rows.start)))
                key_positions = [torch.arange(total)[starts[(rank - step) % ranks]:][:lengths[(rank - step) % ranks]]
                                 for step in range(ranks)]
            elif allowed is not None:
                for step in range(ranks):
                    source = (rank - step) % ranks
                    columns = allowed[..., query_rows, starts[source]:starts[source] + lengths[source]]
                    columns = F.pad(columns, (0, 0, 0, rows - columns.shape[-2]), value=True)
                    masks.append(_additive(columns, dtype))
            arguments = (query_positions, key_positions, list(lengths), None, kernel, rank, ranks, "ring")
            rank_grad = F.pad(grad[:, :, query_rows], (0, 0, 0, rows - (query_rows.stop - query_rows.start)))
            if query.is_cuda:
                # Autograd runs every CPU thread's CUDA backward on its one device thread, where one rank's ring
                # would wait for the next rank's forever: call the backward op directly, as autograd does.
                detached = [mask.detach() for mask in masks]
                with torch.no_grad():
                    output, lse = OP(query, key, value, detached, *arguments)
                    query.grad, key.grad, value.grad, mask_grads = torch.ops.paracompile.ring_attention_backward(
                        rank_grad, query, key, value, output, lse, detached, *arguments, bias is not None)
                if bias is not None:
                    torch.autograd.backward(masks, mask_grads)
            else:
                output, _ = OP(query, key, value, masks, *arguments)
                output.backward(rank_grad)
            real = query_rows.stop - query_rows.start
            results[rank] = dict(
                output=output[:, :, :real], query=query.grad[:, :, :real], query_padding=query.grad[:, :, real:],
                key=key.grad[:, :, :lengths[rank]], value=value.grad[:, :, :lengths[rank]],
                key_padding=key.grad[:, :, lengths[rank]:], value_padding=value.grad[:, :, lengths[rank]:],
                expected_output=expected[:, :, query_rows], expected_query=full[0].grad[:, :, query_rows],
                expected_key=full[1].grad[:, :, own], expected_value=full[2].grad[:, :, own],
                bias=rank_bias.grad if bias is not None else None)
        except BaseException as error:  # noqa: B036 - reported by the main thread
            errors.append(error)
            ring.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:  # the failing rank's own error, not its peers' broken barrier
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    if bias is not None:  # a replicated input: each rank's gradient is a partial, summing to the exact one
        results[0]["bias_sum"] = sum(result["bias"] for result in results)
        results[0]["expected_bias_sum"] = full_bias.grad
    return results


# name -> (block lengths per rank, queries: each rank's own tokens, or how many each rank holds, mask)
CASES = {
    "even": ([6, 6], "own", None),
    "uneven_masked": ([5, 4, 3], "own", "keys"),
    "empty_block_masked": ([5, 0, 4], "own", "keys"),  # rank 1 holds no keys and no queries
    "causal_uneven": ([4, 3, 0, 5], "own", "causal"),
    "queries_split_otherwise": ([3, 5], [6, 2], "keys"),  # a rank's queries need not be its keys' tokens
    "learned_bias": ([5, 0, 4], "own", "bias"),  # a mask that requires grad: its gradient too
}


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_attention_op_gives_eagers_output_and_gradients(name, kernel, monkeypatch):
    lengths, queries, mask_kind = CASES[name]
    for rank, result in enumerate(_ring_case(lengths, queries, mask_kind, kernel, torch.float32, monkeypatch)):
        for what in ("output", "query", "key", "value"):
            if result[what].numel():  # (a rank without tokens has nothing to compare)
                assert_matches(result[what], result[f"expected_{what}"], f"{name} {kernel} rank {rank} {what}")
        if "bias_sum" in result:
            assert_matches(result["bias_sum"], result["expected_bias_sum"], f"{name} {kernel} d bias")
        for padding in ("query_padding", "key_padding", "value_padding"):
            assert torch.count_nonzero(result[padding]) == 0, f"{name} rank {rank}: {padding} gets a gradient"


def test_ring_attention_op_in_bf16_stays_close_to_fp32_eager(monkeypatch):
    """bf16 inputs: the merge and the accumulators run in fp32, so the error is bf16 rounding of the
    inputs and outputs, not of the ring."""
    for result in _ring_case([5, 4, 3], "own", "keys", "cpu_flash", torch.bfloat16, monkeypatch):
        for what in ("output", "query", "key", "value"):
            got, want = result[what].float(), result[f"expected_{what}"]
            assert (got - want).abs().max() <= 0.05 * max(1.0, want.abs().max().item()), what


@pytest.mark.parametrize("grad_mode", [True, False])
def test_a_training_graph_runs_the_ring_in_the_op_and_an_inference_graph_inline(fake_rank0, grad_mode):
    """Rank 0 of a fake 2-rank world (collectives move nothing: the plan and the graph are checked, the
    numbers in tests/test_training.py). Trained, every self-attention of the toy DiT is one ring op and the
    only gather is the unpatchify's (no keys or values gathered); for inference the ring's transfers stay
    functional collectives in the graph, for Inductor to overlap, and no op is emitted."""
    import paracompile.backend as backend
    from tests.toy_dit import ToyDiT, toy_inputs

    torch.manual_seed(0)
    torch._dynamo.reset()
    model, inputs = ToyDiT(), toy_inputs(height=10, width=14, text_length=7, masked=True)
    inputs["latents"].requires_grad_(grad_mode)
    with torch.set_grad_enabled(grad_mode):
        output = torch.compile(model, backend="paracompile",
                               options={"compiler": "eager", "mesh": {"ring": 2}, "check_inputs": "off"})(**inputs)
    if grad_mode:
        output.sum().backward()  # the op's backward runs (its transfers on the fake group)
        assert inputs["latents"].grad is not None
    graph = backend.rewritten_graphs[-1].graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    report = backend.explanations[-1]
    ring_ops = targets.count(torch.ops.paracompile.ring_attention.default)
    transfers = targets.count(torch.ops._c10d_functional.all_to_all_single.default)
    assert report.count("ring over 2 ranks") == 3, report
    if grad_mode:
        assert ring_ops == 3 and transfers == 0, targets
        assert targets.count(torch.ops.paracompile.all_gather.default) == 1, "keys or values gathered"
        assert report.count("training: one differentiable op, cpu_flash backward") == 3, report
    else:
        assert ring_ops == 0 and transfers == 3, targets  # one block transfer per attention (2 ranks)
        assert "training" not in report, report
