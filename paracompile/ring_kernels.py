"""One ring step's attention, and ring attention as one differentiable op for graphs compiled to train.

Invariant: `attend_block` and `merge` compute, for queries against one block of keys, the partial
attention and its log-sum-exp (LSE), and the fp32 merge of partial results into the attention over every
block seen so far; they are the same code in the inference graph (emitted through the GraphBuilder, whose
functional collectives stay visible to Inductor) and inside `paracompile::ring_attention` (run eagerly
through `EagerOps`, a builder whose `call` runs the op). The op returns this rank's exact attention output,
and its backward gives each rank the exact gradient of its queries and of its own key/value block, so it
keeps the gradient convention of differentiable.py (all three are sharded tensors).

How the op runs (forward): the block in hand rotates to the next ring rank in ranks - 1 steps, as in the
inference graph (one `all_to_all_single` whose only non-empty split goes to the neighbour: gloo and the
fake process group run it), each step's transfer overlapping the step's attention. It keeps the output O
and the global LSE L for backward.

Backward (ring flash attention): with D = rowsum(dO * O), the gradient of every block j follows from the
attention backward evaluated with the *global* O and L, since P_ij = exp(S_ij + mask_ij - L_i) is then
block j's share of the global softmax:

    dV_j = P^T dO,   dS = P * (dO V_j^T - D),   dQ += scale dS K_j,   dK_j = scale dS^T Q

The keys and values rotate as in forward; the fp32 accumulators of dK_j and dV_j travel with them, each rank
adding its queries' share, and take one last hop home (ranks shifts), so every rank ends with its own
block's gradients. Rows whose global LSE is -inf (they attend to nothing) get P = 0 through L = +inf.
Kernels: on CPU `_scaled_dot_product_flash_attention_for_cpu_backward`, which takes the global O and L as
they are (checked exact against autograd, masks included: tests/test_ring_kernels.py); on CUDA after any fused
forward kernel, flash attention's backward without a mask and the memory-efficient kernel's with one (the mask
as its bias; benchmarks/ring_backward_check.py checks both against autograd on a GPU); elsewhere an explicit
fp32 computation.
Every rank issues the same collectives in the same order whatever its blocks hold (an empty block is
skipped in compute, never in transfer), so no shape of the data can make the ranks disagree.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from paracompile.collectives import _send_to_next_rank, _wait_for_next_rank
from paracompile.graph_builder import GraphBuilder

aten = torch.ops.aten
SDPBackend = torch.nn.attention.SDPBackend


class EagerOps(GraphBuilder):
    """The GraphBuilder's interface, run now: `call` applies the op to tensors, sizes are plain ints."""

    def __init__(self):  # no graph: nothing is emitted
        pass

    def call(self, target, *args, **kwargs):
        return target(*args, **kwargs)


EAGER = EagerOps()


# ----------------------------------------------------------------------------------------------------
# One step: kernels that return the log-sum-exp, and the merge


def choose_kernel(query_value: torch.Tensor, scale, has_mask: bool, ulysses_size: int) -> str:
    """The kernel SDPA's dispatcher would pick for one ring step's inputs on this device."""
    if query_value.device.type == "cpu":
        return "cpu_flash"
    if query_value.device.type != "cuda":
        return "math"
    shape = [int(_hint(s)) for s in query_value.shape]
    shape[-3] = max(1, shape[-3] // ulysses_size)
    shape = [min(s, 4) if i < len(shape) - 3 else s for i, s in enumerate(shape)]  # batch dims do not matter
    probe = torch.empty(shape, dtype=query_value.dtype, device=query_value.device)
    mask = torch.zeros(shape[:-1] + [shape[-2]], dtype=query_value.dtype, device=query_value.device) \
        if has_mask else None
    try:
        choice = SDPBackend(torch._fused_sdp_choice(probe, probe, probe, mask, 0.0, False, scale=scale))
    except Exception:  # an unknown backend value or a torch without the helper: the exact fp32 path
        return "math"
    if choice == SDPBackend.FLASH_ATTENTION and not has_mask:
        return "flash"
    if choice == SDPBackend.CUDNN_ATTENTION:
        return "cudnn"
    if choice in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION):
        return "efficient"
    return "math"


def backward_kernel(kernel: str) -> str:
    """The kernel family the op's backward uses after forward ran `kernel` (README, Training). On CUDA, the
    fused kernels' ("flash") after every fused forward kernel: they need only the output and the fp32 LSE,
    which the op keeps whatever kernel made them; backward_path picks flash attention's or the
    memory-efficient one per block, or the fp32 path where neither fits."""
    if kernel == "cpu_flash":
        return kernel
    return "flash" if kernel in ("flash", "efficient", "cudnn") else "math"


FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_HEAD_SIZE = 256  # the largest head size flash attention's CUDA kernels take


def _hint(size) -> int:
    if isinstance(size, int):
        return size
    return size.node.hint if size.node.hint is not None else 64


def additive_mask(ops, mask, mask_dtype, dtype):
    """The kernels take additive masks: a boolean one (True = attend) becomes 0 / -inf."""
    if mask_dtype != torch.bool:
        return mask if mask_dtype == dtype else ops.call(aten._to_copy.default, mask, dtype=dtype)
    blocked = ops.call(aten.logical_not.default, mask)
    zeros = ops.call(aten.zeros_like.default, mask, dtype=dtype)
    return ops.call(aten.masked_fill.Scalar, zeros, blocked, float("-inf"))


def causal_mask(ops, query_positions, key_positions, dtype):
    """The additive mask of `is_causal` for queries and keys at these global positions: a key attends
    from the queries at or after it."""
    allowed = ops.call(aten.le.Tensor, ops.call(aten.unsqueeze.default, key_positions, 0),
                       ops.call(aten.unsqueeze.default, query_positions, 1))
    return additive_mask(ops, allowed, torch.bool, dtype)


def attend_block(ops, kernel: str, query, key, value, mask, scale, ndim: int, masked: bool):
    """(output in fp32, LSE in fp32 of shape output.shape[:-1]) of the queries' attention over this block
    only. `ops`: the GraphBuilder (inference graph) or EAGER (inside the op)."""
    output, lse = _partial_attention(ops, kernel, query, key, value, mask, scale, ndim)
    if masked:
        # A query row whose keys in this block are all masked must not count: kernels disagree on what
        # they return for it (CPU flash: LSE 0), so set its LSE to -inf and its output to 0.
        empty = ops.call(aten.isneginf.default, ops.call(aten.amax.default, mask, [-1]))
        lse = ops.call(aten.where.ScalarSelf, empty, float("-inf"), lse)
        output = ops.call(aten.where.ScalarSelf, ops.call(aten.unsqueeze.default, empty, -1), 0.0, output)
    return output, lse


def merge(ops, output, lse, step_output, step_lse, may_be_empty: bool):
    """The running (output, LSE) with one more block's partial result merged in, in fp32:

        lse_new = logaddexp(lse, lse_step);   out = out + exp(lse_step - lse_new) * (out_step - out)

    `may_be_empty`: a row may have seen no key yet (LSE -inf on both sides), whose weight is 0, not NaN."""
    if output is None:
        return step_output, step_lse
    merged_lse = ops.call(aten.logaddexp.default, lse, step_lse)
    weight = ops.call(aten.exp.default, ops.call(aten.sub.Tensor, step_lse, merged_lse))
    if may_be_empty:
        weight = ops.call(aten.nan_to_num.default, weight, 0.0)
    weight = ops.call(aten.unsqueeze.default, weight, -1)
    output = ops.call(aten.add.Tensor, output, ops.call(
        aten.mul.Tensor, weight, ops.call(aten.sub.Tensor, step_output, output)))
    return output, merged_lse


def _partial_attention(ops, kernel: str, query, key, value, mask, scale, ndim: int):
    if kernel == "cpu_flash":
        result = ops.call(aten._scaled_dot_product_flash_attention_for_cpu.default, query, key, value, 0.0,
                          False, attn_mask=mask, scale=scale)
        return _output_and_lse(ops, result, query)
    if kernel == "flash":
        result = ops.call(aten._scaled_dot_product_flash_attention.default, query, key, value, 0.0, False,
                          False, scale=scale)
        return _output_and_lse(ops, result, query)
    if kernel in ("efficient", "cudnn"):
        bias = None
        if mask is not None:
            # The kernels read a [B, H, Lq, Lk] bias whose rows start on 16-element boundaries.
            bias = ops.call(aten.expand.default, mask, _attention_scores_shape(ops, query, key))
            length = ops.call(aten.sym_size.int, key, ndim - 2)
            aligned = ops.mul(ops.ceildiv(length, 16), 16)
            bias = ops.narrow(ops.pad_end(bias, 3, 4, ops.sub(aligned, length)), 3, 0, length)
        target = (aten._scaled_dot_product_efficient_attention.default if kernel == "efficient"
                  else aten._scaled_dot_product_cudnn_attention.default)
        result = ops.call(target, query, key, value, bias, True, 0.0, False, scale=scale)
        return _output_and_lse(ops, result, query)
    return _math_attention(ops, query, key, value, mask, scale)


def _output_and_lse(ops, result, query):
    output = ops.call(aten._to_copy.default, ops.call(operator.getitem, result, 0), dtype=torch.float32)
    lse = ops.call(operator.getitem, result, 1)
    # CUDA kernels pad the LSE's query dim (efficient: to a multiple of 32) or add a trailing dim (cuDNN).
    rows = ops.call(aten.sym_size.int, query, -2)
    lse = ops.call(aten.reshape.default, lse, [ops.call(aten.sym_size.int, query, d) for d in range(2)] + [-1])
    lse = ops.narrow(lse, 2, 0, rows)
    return output, ops.call(aten._to_copy.default, lse, dtype=torch.float32)


def _attention_scores_shape(ops, query, key):
    return [ops.call(aten.sym_size.int, query, 0), ops.call(aten.sym_size.int, query, 1),
            ops.call(aten.sym_size.int, query, 2), ops.call(aten.sym_size.int, key, 2)]


def _math_attention(ops, query, key, value, mask, scale):
    query = ops.call(aten._to_copy.default, query, dtype=torch.float32)
    key = ops.call(aten._to_copy.default, key, dtype=torch.float32)
    value = ops.call(aten._to_copy.default, value, dtype=torch.float32)
    if scale is None:  # SDPA's default, 1 / sqrt(head size)
        scale = ops.call(aten.rsqrt.default, ops.call(
            aten.scalar_tensor.default, ops.call(aten.sym_size.int, query, -1), dtype=torch.float32))
    scores = ops.call(aten.matmul.default, query, ops.call(aten.transpose.int, key, -2, -1))
    scores = ops.call(aten.mul.Tensor, scores, scale)
    if mask is not None:
        scores = ops.call(aten.add.Tensor, scores, mask)
    lse = ops.call(aten.logsumexp.default, scores, [-1], True)
    probabilities = ops.call(aten.exp.default, ops.call(aten.sub.Tensor, scores, lse))
    output = ops.call(aten.matmul.default, probabilities, value)
    return output, ops.call(aten.squeeze.dim, lse, -1)


# ----------------------------------------------------------------------------------------------------
# One block's backward with the global output and LSE


def backward_path(kernel: str, query, key, value, bias, mask_grad: bool) -> str:
    """Which backward one block takes: `kernel` is backward_kernel's, `bias` the block's mask as
    `_efficient_bias` lays it out (None without a mask). On CUDA, flash attention's backward without a mask
    (fp16/bf16, head size <= 256), else the memory-efficient kernel's, which takes the mask as its bias (and
    gives the bias' gradient); the fp32 math path only where neither fits (it materialises the block's
    [Lq, Lk] scores in fp32)."""
    if kernel == "cpu_flash":
        return "math" if mask_grad else "cpu_flash"
    if kernel != "flash" or not query.is_cuda:
        return "math"
    if bias is None and not mask_grad and query.dtype in FLASH_DTYPES and query.shape[-1] <= FLASH_HEAD_SIZE \
            and value.shape[-1] == query.shape[-1]:
        return "flash"
    # The memory-efficient backward takes a bias tensor, never none: without a mask (fp32, larger heads) it is
    # the math path.
    if bias is not None and _efficient_fits(query, key, value, bias):
        return "efficient"
    return "math"


def _efficient_fits(query, key, value, bias) -> bool:
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, bias, 0.0, False, False)
        return bool(torch.backends.cuda.can_use_efficient_attention(params, False))
    except Exception:  # a torch whose SDPAParams takes other arguments: the exact fp32 path
        return False


MEMORY_EFFICIENT_ALIGNMENT = 16  # the memory-efficient kernel reads its bias rows at this alignment (elements)


def _efficient_bias(mask, query, key):
    """The mask as the memory-efficient kernel takes its bias (what SDPA's `preprocess_mask` does): in the
    queries' dtype; where a stride is not a multiple of the kernel's alignment (a mask sliced out of a wider
    one, a length that is not a multiple of it), rows padded to the alignment then sliced back; broadcast to
    [B, H, Lq, Lk]."""
    bias = mask.to(query.dtype)
    aligned = bias.stride(-1) == 1 and all(stride % MEMORY_EFFICIENT_ALIGNMENT == 0
                                           for stride in bias.stride()[:-1])
    if not aligned:
        length = bias.shape[-1]
        bias = torch.nn.functional.pad(bias, (0, -length % MEMORY_EFFICIENT_ALIGNMENT))[..., :length]
    return bias.expand(*query.shape[:-1], key.shape[-2])


def _heads_inner(tensor):
    """[B, H, L, E] with the memory of [B, L, H, E], as SDPA's memory-efficient forward lays out its output:
    its backward (fp16/bf16) finds a query row of `out` and of `grad` by that layout, whatever the strides say.
    A tensor already laid out so is returned as it is (ring_attention_backward lays out its own once)."""
    swapped = tensor.transpose(1, 2)
    return tensor if swapped.is_contiguous() else swapped.contiguous().transpose(1, 2)


def block_backward(kernel: str, grad, query, key, value, out, lse, delta, mask, scale, mask_grad: bool = False):
    """(dQ share, dK, dV, d mask or None) of one block, in fp32. `out`, `lse`: the global output and LSE
    (LSE +inf on rows that attend to nothing); `delta`: rowsum(dO * O) in fp32. `kernel`: backward_kernel's;
    the path within it: backward_path's."""
    bias = _efficient_bias(mask, query, key) if mask is not None and kernel == "flash" and query.is_cuda else None
    path = backward_path(kernel, query, key, value, bias, mask_grad)
    if path == "cpu_flash":
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, out, lse, 0.0, False, attn_mask=mask, scale=scale)
        return (*(g.float() for g in grads), None)
    if path == "flash":
        # No dropout: the generator state the kernel takes (shaped as forward returns it) is never read.
        seed = torch.zeros(2, dtype=torch.uint64, device=query.device)
        offset = torch.zeros((), dtype=torch.uint64, device=query.device)
        grads = aten._scaled_dot_product_flash_attention_backward(
            grad, query, key, value, out, lse, None, None, query.shape[-2], key.shape[-2], 0.0, False, seed,
            offset, scale=scale)
        return (*(g.float() for g in grads), None)
    if path == "efficient":
        # The kernel's LSE rows are padded to a multiple of 32 queries; the padding rows are never read.
        padded_lse = torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=query.device)  # no dropout: never read
        grad_query, grad_key, grad_value, grad_bias = aten._scaled_dot_product_efficient_attention_backward(
            _heads_inner(grad), query, key, value, bias, _heads_inner(out), padded_lse, seed, seed, 0.0,
            [True, True, True, mask_grad], False, scale=scale)
        grad_mask = _summed_to(grad_bias, mask.shape) if mask_grad else None
        return grad_query.float(), grad_key.float(), grad_value.float(), grad_mask
    return _math_block_backward(grad, query, key, value, lse, delta, mask, scale, mask_grad)


def _summed_to(gradient, shape):
    """`gradient` summed over the dims `shape` broadcasts, in fp32 (without an fp32 copy of the whole)."""
    lead = gradient.dim() - len(shape)
    dims = [d for d in range(gradient.dim()) if d < lead or (shape[d - lead] == 1 and gradient.shape[d] != 1)]
    summed = gradient.sum(dims, dtype=torch.float32, keepdim=True) if dims else gradient.float()
    return summed.reshape(shape)


def _math_block_backward(grad, query, key, value, lse, delta, mask, scale, mask_grad):
    query, key, value, grad = query.float(), key.float(), value.float(), grad.float()
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scores = query @ key.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    probabilities = torch.exp(scores - lse.unsqueeze(-1))
    grad_value = probabilities.transpose(-2, -1) @ grad
    grad_scores = probabilities * (grad @ value.transpose(-2, -1) - delta.unsqueeze(-1))
    # The mask is added to the scaled scores: its gradient is the scores' own, summed over where it broadcasts.
    grad_mask = grad_scores.sum_to_size(mask.shape) if mask_grad else None
    return grad_scores @ key * scale, grad_scores.transpose(-2, -1) @ query * scale, grad_value, grad_mask


# ----------------------------------------------------------------------------------------------------
# The op


def _shift(tensors, rank: int, ranks: int, group_name: str):
    """Starts passing `tensors` (stacked when they can be: one message) one step round the ring, with the
    inference graph's transfer (collectives._send_to_next_rank); `_finish` waits for it."""
    stackable = len(tensors) > 1 and all(t.shape == tensors[0].shape and t.dtype == tensors[0].dtype
                                         for t in tensors)
    if stackable:
        return _send_to_next_rank(torch.stack(tensors), rank=rank, ranks=ranks, group_name=group_name), len(tensors)
    return [_send_to_next_rank(t, rank=rank, ranks=ranks, group_name=group_name) for t in tensors], None


def _finish(pending):
    received, stacked = pending
    if stacked is not None:
        return tuple(_wait_for_next_rank(received).unbind(0))
    return tuple(_wait_for_next_rank(r) for r in received)


def _narrow_keys(tensor, length: int):
    return tensor.narrow(-2, 0, length)


@torch.library.custom_op("paracompile::ring_attention", mutates_args=())
def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: list[torch.Tensor],
                   query_positions: Optional[torch.Tensor], key_positions: list[torch.Tensor], lengths: list[int],
                   scale: Optional[float], kernel: str, rank: int, ranks: int,
                   group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(output in the queries' dtype, LSE in fp32) of the queries [B, H, Lq, E] over the keys of every ring
    rank. `key`, `value`: this rank's block [B, H, longest, E], its first `lengths[rank]` tokens real;
    `masks`: none, or one per step: the additive mask of the block in hand at `step` (from ring rank
    (rank - step) % ranks), its columns that block's real tokens (any tensor where the block is empty: it
    is not read); or, for `is_causal`, the global positions of the queries (`query_positions`) and of each
    step's keys (`key_positions`, one per step likewise); `lengths[j]`: block j's token count."""
    masked = bool(masks) or query_positions is not None
    output = lse = None
    block = (key, value)
    for step in range(ranks):
        pending = _shift(block, rank, ranks, group_name) if step < ranks - 1 else None
        length = lengths[(rank - step) % ranks]
        if length > 0:
            step_output, step_lse = attend_block(
                EAGER, kernel, query, _narrow_keys(block[0], length), _narrow_keys(block[1], length),
                _step_mask(masks, query_positions, key_positions, step, query.dtype), scale, query.dim(), masked)
            output, lse = merge(EAGER, output, lse, step_output, step_lse, masked)
        if pending is not None:
            block = _finish(pending)
    if output is None:  # no rank holds a key: attention over nothing
        output = query.new_zeros(query.shape[:-1] + value.shape[-1:], dtype=torch.float32)
        lse = torch.full(query.shape[:-1], float("-inf"), dtype=torch.float32, device=query.device)
    # Contiguous, as the fake implementation says (Inductor checks the strides of what an op returns).
    return output.to(query.dtype).contiguous(), lse.contiguous()


def _step_mask(masks, query_positions, key_positions, step: int, dtype):
    if masks:
        return masks[step]
    if query_positions is not None:
        return causal_mask(EAGER, query_positions, key_positions[step], dtype)
    return None


@ring_attention.register_fake
def _(query, key, value, masks, query_positions, key_positions, lengths, scale, kernel, rank, ranks, group_name):
    return (query.new_empty(query.shape[:-1] + value.shape[-1:]),
            query.new_empty(query.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("paracompile::ring_attention_backward", mutates_args=())
def ring_attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, masks: list[torch.Tensor],
                            query_positions: Optional[torch.Tensor], key_positions: list[torch.Tensor],
                            lengths: list[int], scale: Optional[float], kernel: str, rank: int, ranks: int,
                            group_name: str, mask_grads: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dQ, dK, dV, dMasks) of ring_attention: this rank's queries, its own key/value block (zero on the
    block's padding), and with `mask_grads` each step's mask (zero where the step's block is empty); without,
    no mask gradients."""
    kernel = backward_kernel(kernel)
    grad = grad.to(out.dtype).contiguous()
    if kernel == "flash" and query.is_cuda and (masks or query_positions is not None):
        # Every block has a mask, so none takes flash attention's backward: lay out the output and its gradient
        # for the memory-efficient kernel once, not once per ring step.
        grad, out = _heads_inner(grad), _heads_inner(out)
    # A row that attends to nothing has output 0 and LSE -inf; with L = +inf its P is 0 instead of NaN.
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    delta = (grad.float() * out.float()).sum(-1)
    grad_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    grad_masks = [torch.zeros_like(mask) for mask in masks] if mask_grads else []
    block = (key, value)
    accumulators = pending_accumulators = None
    for step in range(ranks):
        pending = _shift(block, rank, ranks, group_name) if step < ranks - 1 else None
        length = lengths[(rank - step) % ranks]
        block_grads = None
        if length > 0:
            step_query_grad, *block_grads, grad_mask = block_backward(
                kernel, grad, query, _narrow_keys(block[0], length), _narrow_keys(block[1], length), out, lse,
                delta, _step_mask(masks, query_positions, key_positions, step, query.dtype), scale, mask_grads)
            grad_query += step_query_grad
            if grad_mask is not None:
                grad_masks[step] = torch.empty_like(masks[step]).copy_(grad_mask)  # the fake's strides
        # The block's accumulators come from the rank that held it last step (computed while they travelled).
        accumulators = (_finish(pending_accumulators) if pending_accumulators is not None else
                        (torch.zeros(key.shape, dtype=torch.float32, device=key.device),
                         torch.zeros(value.shape, dtype=torch.float32, device=value.device)))
        if block_grads is not None:  # the padding keys past `length` keep their zero gradient
            for accumulator, block_grad in zip(accumulators, block_grads):
                accumulator.narrow(-2, 0, length).add_(block_grad)
        pending_accumulators = _shift(accumulators, rank, ranks, group_name)  # after the last step: home
        if pending is not None:
            block = _finish(pending)
    grad_key, grad_value = _finish(pending_accumulators)
    # Copies with the fake's strides: the two arrive as views of one message (an op's outputs must not alias
    # each other), and Inductor checks the strides of what an op returns.
    return (torch.empty_like(query).copy_(grad_query), torch.empty_like(key).copy_(grad_key),
            torch.empty_like(value).copy_(grad_value), grad_masks)


@ring_attention_backward.register_fake
def _(grad, query, key, value, out, lse, masks, query_positions, key_positions, lengths, scale, kernel, rank, ranks,
      group_name, mask_grads):
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            [torch.empty_like(mask) for mask in masks] if mask_grads else [])


def _setup(ctx, inputs, output):
    query, key, value, masks, query_positions, key_positions, lengths, scale, kernel, rank, ranks, group_name = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], query_positions, *masks, *key_positions)
    ctx.mark_non_differentiable(output[1])  # the LSE is for backward only: the graph reads the output alone
    ctx.counts = (len(masks), len(key_positions))
    ctx.arguments = (lengths, scale, kernel, rank, ranks, group_name)


def _backward(ctx, grad, grad_lse):
    query, key, value, out, lse, query_positions, *rest = ctx.saved_tensors
    masks, key_positions = rest[:ctx.counts[0]], rest[ctx.counts[0]:]
    # A mask that requires grad (a learned bias) gets its gradient from the kernel backward_path picks.
    mask_grads = bool(masks) and any(ctx.needs_input_grad[3])
    *grads, grad_masks = ring_attention_backward(grad, query, key, value, out, lse, masks, query_positions,
                                                 key_positions, *ctx.arguments, mask_grads)
    return (*grads, grad_masks if mask_grads else [None] * len(masks), None, [None] * len(key_positions),
            None, None, None, None, None, None)


ring_attention.register_autograd(_backward, setup_context=_setup)
