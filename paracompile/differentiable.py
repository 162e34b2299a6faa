"""Collectives with a backward, for graphs compiled to train (`loss.backward()` through a mesh).

Invariant (the gradient convention): in backward, a *sharded* tensor's gradient on a rank is the exact
gradient of its shard, and a *replicated* tensor's gradient on a rank is a partial: the sum over the ranks
of those partials is the exact gradient. Every op of the rewritten graph keeps this: an op on a shard or a
replicated op is linear in its incoming gradient, so plain autograd keeps it; slicing a replicated tensor
into a shard scatters the shard's exact gradient into zeros (a partial) by itself; and each collective
below has the backward that keeps it:

- all-gather (shard -> replicated): backward reduce-scatters the partials, so each shard gets the sum;
- all-reduce of partial sums (a contraction over tokens -> replicated): backward all-reduces the partials,
  since every rank's summand needs the full gradient;
- all-to-all (shard -> shard, Ulysses): backward sends every gradient back where its value came from;
- ring attention (ring_kernels.py, `paracompile::ring_attention`): shards in, shards out; backward gives
  each rank the exact gradients of its queries and of its own key/value block (and a partial for a
  replicated mask that requires grad);
- `scale_grad` at the graph's outputs: every rank computes the same loss from the same replicated output, so
  each holds the full gradient of it; divided by the number of ranks that hold it, it becomes a partial.

At the inputs, the partials of every replicated input (weights, and data inputs that require grad) are
summed over the ranks by `SumGradsOverRanks` (one all-reduce for all of them), so every rank ends with the
same exact gradients, as single-process autograd gives them.

These are custom ops (`torch.ops.paracompile.*`) with their autograd registered, so the eager graph and
AOTAutograd (Inductor) both differentiate them. Inductor gets them as the functional collectives they run
(`FUNCTIONAL_COLLECTIVES`, added to its decomposition table and applied below autograd when AOTAutograd
traces the forward and backward), so it chains each to the one before it in graph order
(`decide_global_ordering_of_comms`), as in inference graphs. As opaque kernels, its scheduler could order two
independent ones differently on ranks whose uneven shards give them other sizes: the backward's three
all-to-alls of dQ, dK and dV, on 11 tokens over 2 ranks, crashed gloo with a size mismatch. (Passed to
`compile_fx` as a table of its own instead, the decompositions made Inductor skip its graph cache, and warm
starts lost every graph.) `SumGradsOverRanks`' bucketed all-reduce runs after the compiled backward, outside
Inductor, in the same order on every rank.
The ring attention op (ring_kernels.py) stays opaque: its collectives run inside it, in its own fixed order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

functional = torch.ops._c10d_functional


def _all_gather(tensor: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    """Every rank's tensor, concatenated along dim 0 in rank order."""
    return functional.wait_tensor(functional.all_gather_into_tensor(tensor.contiguous(), group_size, group_name))


def _reduce_scatter(tensor: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    """The sum over the ranks of `tensor`, of which this rank keeps its block of dim 0."""
    return functional.wait_tensor(functional.reduce_scatter_tensor(tensor.contiguous(), "sum", group_size, group_name))


def _all_reduce(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    return functional.wait_tensor(functional.all_reduce(tensor.contiguous(), "sum", group_name))


def _all_to_all(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group_name: str) -> torch.Tensor:
    """Block i of dim 0 (sized by `input_splits`) goes to rank i; what rank i sent lands in block i of the
    result (sized by `output_splits`)."""
    return functional.wait_tensor(functional.all_to_all_single(tensor.contiguous(), output_splits, input_splits,
                                                               group_name))


all_gather = torch.library.custom_op("paracompile::all_gather", _all_gather, mutates_args=())


@all_gather.register_fake
def _(tensor, group_size, group_name):
    return tensor.new_empty((tensor.shape[0] * group_size, *tensor.shape[1:]))


reduce_scatter = torch.library.custom_op("paracompile::reduce_scatter", _reduce_scatter, mutates_args=())


@reduce_scatter.register_fake
def _(tensor, group_size, group_name):
    return tensor.new_empty((tensor.shape[0] // group_size, *tensor.shape[1:]))


all_reduce = torch.library.custom_op("paracompile::all_reduce", _all_reduce, mutates_args=())


@all_reduce.register_fake
def _(tensor, group_name):
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


all_to_all = torch.library.custom_op("paracompile::all_to_all", _all_to_all, mutates_args=())


@all_to_all.register_fake
def _(tensor, output_splits, input_splits, group_name):
    return tensor.new_empty((sum(output_splits), *tensor.shape[1:]))


@torch.library.custom_op("paracompile::scale_grad", mutates_args=())
def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """`tensor` itself (a copy); its gradient is multiplied by `factor`."""
    return tensor.clone()


@scale_grad.register_fake
def _(tensor, factor):
    return torch.empty_like(tensor)


def _setup_group(ctx, inputs, output):
    ctx.arguments = inputs[1:]


all_gather.register_autograd(lambda ctx, grad: (reduce_scatter(grad, *ctx.arguments), None, None),
                             setup_context=_setup_group)
reduce_scatter.register_autograd(lambda ctx, grad: (all_gather(grad, *ctx.arguments), None, None),
                                 setup_context=_setup_group)
all_reduce.register_autograd(lambda ctx, grad: (all_reduce(grad, *ctx.arguments), None),
                             setup_context=_setup_group)
all_to_all.register_autograd(
    lambda ctx, grad: (all_to_all(grad, ctx.arguments[1], ctx.arguments[0], ctx.arguments[2]), None, None, None),
    setup_context=_setup_group)
scale_grad.register_autograd(lambda ctx, grad: (grad * ctx.arguments[0], None), setup_context=_setup_group)


BUCKET_BYTES = 64 * 2 ** 20  # gradients all-reduced together per collective: few calls, little extra memory


class SumGradsOverRanks(torch.autograd.Function):
    """The identity on replicated inputs; in backward, their partial gradients summed over every rank (see
    the module docstring), so every rank holds the exact gradients. Gradients of one dtype travel together
    in buckets of up to BUCKET_BYTES, each flattened into one buffer for one all-reduce in that dtype (as
    DDP does) and copied back into the gradients it came from: the peak grows by one bucket. (One float32
    buffer for all of them added twice the bf16 gradients' size; buckets kept until the end, their size.)"""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads):
        summed = list(grads)
        by_dtype: dict = {}
        for index, grad in enumerate(grads):
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(index)
        for indices in by_dtype.values():
            bucket, size = [], 0
            for index in indices + [None]:
                grad = grads[index] if index is not None else None
                if bucket and (index is None or size + grad.numel() * grad.element_size() > BUCKET_BYTES):
                    flat = torch.cat([grads[i].reshape(-1) for i in bucket])
                    dist.all_reduce(flat)
                    offset = 0
                    for i in bucket:  # back into the gradients autograd handed over: no second copy lives on
                        summed[i] = grads[i].copy_(flat[offset:offset + grads[i].numel()].view_as(grads[i]))
                        offset += grads[i].numel()
                    bucket, size = [], 0
                if index is not None:
                    bucket.append(index)
                    size += grad.numel() * grad.element_size()
        return tuple(summed)


OPS = torch.ops.paracompile  # the ops above, as graph nodes name them (`OPS.all_gather.default`)

# The collectives above as Inductor should see them (see the module docstring): what each op runs.
FUNCTIONAL_COLLECTIVES = {OPS.all_gather.default: _all_gather, OPS.reduce_scatter.default: _reduce_scatter,
                          OPS.all_reduce.default: _all_reduce, OPS.all_to_all.default: _all_to_all}


def show_inductor_functional_collectives() -> None:
    """Adds FUNCTIONAL_COLLECTIVES to Inductor's decomposition table, once per process (the backend calls it
    before each Inductor compile). Inductor caches the table it builds from its registry, so that cache is
    cleared when an entry is added."""
    from torch._inductor import decomposition

    missing = {op: run for op, run in FUNCTIONAL_COLLECTIVES.items() if op not in decomposition.decompositions}
    if missing:
        decomposition.decompositions.update(missing)
        cached_table = getattr(decomposition, "fast_random_decomps", None)
        if hasattr(cached_table, "cache_clear"):
            cached_table.cache_clear()
