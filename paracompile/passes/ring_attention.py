"""Ring attention (with Ulysses inside each ring step when the mesh has both).

Invariant: the rewritten attention returns this rank's token shard of exactly the output the original
node computes on full tensors.

Tokens are split over the sequence group (ring x ulysses ranks; see mesh.py). With a Ulysses degree u
above 1, one all-to-all inside the Ulysses group first turns this rank's tokens x all heads into the
group's tokens x this rank's heads, as in plain Ulysses. Each rank then keeps its queries, and the keys
and values of its Ulysses group (a *block*: padding dropped, so a block holds exactly its ranks' tokens)
travel round the ring in r - 1 steps. Every step attends the queries to the block in hand with a kernel
that also returns the log-sum-exp (LSE), and merges the partial output into a running one in fp32:

    lse_new = logaddexp(lse, lse_step)
    out     = out + exp(lse_step - lse_new) * (out_step - out)

The transfer of the next block is issued before the current step's attention and waited for after it,
so the collective overlaps the compute. Blocks of unequal length (uneven shards) are padded to the
longest for the transfer; the receiver narrows each to its sender's length, which it knows because
every rank's shard length follows from the layout.

Masks and `is_causal`: the mask rows of this rank's queries and the mask columns of each block's keys
are sliced from the full mask; causal masks are built from the global positions of both. Kernels: on
CPU `_scaled_dot_product_flash_attention_for_cpu`; on CUDA the flash, memory-efficient or cuDNN kernel
that SDPA's own dispatcher picks for these inputs (`torch._fused_sdp_choice`), or an explicit fp32
computation where it picks the math kernel (ring_kernels.py holds the step's attention and the merge).

Training (a graph compiled with grad mode on, the ring group `differentiable`): everything up to the
loop is built as above, and so are the masks of every step, but the loop itself (transfers, attention,
merge) runs inside one op, `paracompile::ring_attention`, whose backward is ring flash attention's
(ring_kernels.py): each rank still holds only its own key/value block plus the one in flight, in
backward too. Its collectives run eagerly inside the op, so Inductor does not see them.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from paracompile import collectives
from paracompile.differentiable import OPS as differentiable_ops
from paracompile.explain import describe_node
from paracompile.meta import mark_attention
from paracompile.passes.token_layout import same_size
from paracompile.ring_kernels import additive_mask, attend_block, backward_kernel, causal_mask, choose_kernel, merge

aten = torch.ops.aten


def ring_attention(rewriter, node: fx.Node, view, layouts, heads) -> None:
    builder, mesh = rewriter.builder, rewriter.mesh
    sequence, ulysses, ring = mesh.sequence, mesh.ulysses, mesh.ring
    ulysses_size = ulysses.size if ulysses is not None else 1
    name = describe_node(node)
    query_layout, key_layout, value_layout = layouts
    query_shape, key_shape = view.shape(view["query"]), view.shape(view["key"])
    ndim = len(query_shape)
    token_dim, head_dim = ndim - 2, ndim - 3
    causal = bool(view["is_causal"])
    scale = view["scale"]
    query_value = view["query"].meta["val"]
    ring_index = ring.rank
    # A graph compiled to train runs the ring loop inside one differentiable op (ring_kernels.py); the
    # graph still builds everything around it (shards, Ulysses, padding, masks per step) as for inference.
    training = ring.differentiable

    def ranks_of_block(ring_position: int) -> list[int]:
        return list(mesh.ring_blocks[ring_position])

    my_ranks = ranks_of_block(ring_index)

    # `layouts` are the site's (SequenceAttention.plan): values split apart from their keys come re-cut to
    # the keys' split, since each ring step sends a key block with its value block, token for token.
    query = rewriter.sharded(view["query"], query_layout, name)
    key = rewriter.sharded(view["key"], key_layout, name)
    value = rewriter.sharded(view["value"], value_layout, f"{name} (ring needs values split as the keys are)")
    key_heads = key_shape[head_dim]
    if not same_size(heads, key_heads):
        # Grouped-query attention: give every query head its key head, so heads split evenly.
        repeats = heads // key_heads
        key = builder.call(aten.repeat_interleave.self_int, key, repeats, head_dim)
        value = builder.call(aten.repeat_interleave.self_int, value, repeats, head_dim)

    # Ulysses inside the block: queries stay in padded rank-major order (the way back needs it); keys
    # and values drop their padding, so padded keys never take part in a softmax.
    if ulysses_size > 1:
        query = _scatter_heads(builder, query, ndim, query_layout, sequence, ulysses, head_dim, token_dim)
        key = collectives.drop_padding(
            builder, _scatter_heads(builder, key, ndim, key_layout, sequence, ulysses, head_dim, token_dim),
            key_layout, sequence, my_ranks)
        value = collectives.drop_padding(
            builder, _scatter_heads(builder, value, ndim, value_layout, sequence, ulysses, head_dim, token_dim),
            value_layout, sequence, my_ranks)

    block_lengths = [collectives.shards_length(builder, key_layout, sequence, ranks_of_block(j)) for j in range(ring.size)]
    longest = builder.maximum(*block_lengths)
    even_blocks = all(isinstance(n, int) for n in block_lengths) and len(set(block_lengths)) == 1
    if not even_blocks:
        key = builder.pad_end(key, token_dim, ndim, builder.sub(longest, block_lengths[ring_index]))
        value = builder.pad_end(value, token_dim, ndim, builder.sub(longest, block_lengths[ring_index]))
    same_kind = _same_shapes(key_shape, view.shape(view["value"])) and \
        view["key"].meta["val"].dtype == view["value"].meta["val"].dtype and not training
    block = builder.call(aten.stack.default, [key, value], 0) if same_kind else None

    # Masks: this rank's query rows (in the order the queries are in now), then per block its columns.
    mask = view["attn_mask"]
    query_rows = None
    if isinstance(mask, fx.Node):
        full_mask = rewriter.replicated(mask, f"{name}: attention masks are sliced per ring step")
        mask_shape = view.shape(mask)
        full_mask = mask_to_query_heads(builder, full_mask, mask_shape, heads, ulysses)
        if len(mask_shape) >= 2 and not same_size(mask_shape[-2], 1):
            query_rows = _query_order(builder, full_mask, len(mask_shape) - 2, len(mask_shape), query_layout,
                                      sequence, my_ranks, ulysses_size)
        else:
            query_rows = full_mask
    elif causal:
        device = query_value.device
        positions = builder.call(aten.arange.default, builder.size(query_layout.length), dtype=torch.int64,
                                 device=device)
        query_positions = _query_order(builder, positions, 0, 1, query_layout.at_dim(0), sequence, my_ranks,
                                       ulysses_size)

    # A rank may hold no queries (a short segment over many ranks): give the kernel one padding row.
    query_length = None
    if ulysses_size == 1:
        query_length = collectives.SegmentArithmetic(builder, query_layout, sequence).local_length()
        query_padding = builder.sub(builder.maximum(query_length, 1), query_length)
        if isinstance(query_padding, int) and query_padding == 0:
            query_length = None
        else:
            query = builder.pad_end(query, token_dim, ndim, query_padding)
            if isinstance(mask, fx.Node) and query_rows is not full_mask:
                query_rows = builder.pad_end(query_rows, len(view.shape(mask)) - 2, len(view.shape(mask)),
                                             query_padding)
            elif causal:
                query_positions = builder.pad_end(query_positions, 0, 1, query_padding)

    kernel = choose_kernel(query_value, scale, has_mask=isinstance(mask, fx.Node) or causal,
                           ulysses_size=ulysses_size)
    masked = isinstance(mask, fx.Node) or causal
    may_be_empty = not even_blocks and any(not isinstance(length, int) for length in block_lengths)
    output = log_sum_exp = None
    pending = None
    step_masks, step_positions = [], []  # training: each step's mask, or its keys' positions, for the op
    for step in range(ring.size):
        source = (ring_index - step) % ring.size
        if step < ring.size - 1 and not training:
            # Start moving the next block before attending to this one, so the two overlap.
            if same_kind:
                pending = collectives.send_to_next_rank(builder, block, ndim + 1, ring)
            else:
                pending = (collectives.send_to_next_rank(builder, key, ndim, ring),
                           collectives.send_to_next_rank(builder, value, ndim, ring))
        if same_kind:
            step_key = builder.call(aten.select.int, block, 0, 0)
            step_value = builder.call(aten.select.int, block, 0, 1)
        else:
            step_key, step_value = key, value
        length = block_lengths[source]
        if isinstance(length, int) and length == 0:
            # The block holds no keys (its ranks' shards are empty): nothing to attend to.
            step_masks.append(None)
            step_positions.append(None)
            block, key, value, pending = _receive(builder, pending, same_kind, block, key, value, ndim)
            continue
        # A block whose length is symbolic may turn out empty: attend to at least one (padding) key and
        # discard the step's result below if it was empty. (The op knows the length when it runs and skips
        # an empty block.)
        maybe_empty = may_be_empty and not isinstance(length, int) and not training
        kept = builder.maximum(length, 1) if maybe_empty else length
        if not even_blocks and not training:
            step_key = builder.narrow(step_key, token_dim, 0, kept)
            step_value = builder.narrow(step_value, token_dim, 0, kept)

        step_mask = None
        if isinstance(mask, fx.Node):
            mask_shape = view.shape(mask)
            if len(mask_shape) >= 1 and not same_size(mask_shape[-1], 1):
                step_mask = collectives.select_shards(builder, query_rows, key_layout.at_dim(len(mask_shape) - 1),
                                                      sequence, ranks_of_block(source))
                if maybe_empty:
                    step_mask = builder.pad_end(step_mask, len(mask_shape) - 1, len(mask_shape),
                                                builder.sub(kept, length))
            else:
                step_mask = query_rows
            step_mask = additive_mask(builder, step_mask, mask.meta["val"].dtype, query_value.dtype)
        elif causal:
            key_positions = collectives.select_shards(builder, positions, key_layout.at_dim(0), sequence,
                                                      ranks_of_block(source))
            if maybe_empty:
                key_positions = builder.pad_end(key_positions, 0, 1, builder.sub(kept, length))
            if training:  # the op builds each step's causal mask from the positions, in forward and backward
                step_positions.append(key_positions)
                continue
            step_mask = causal_mask(builder, query_positions, key_positions, query_value.dtype)
        if training:
            step_masks.append(step_mask)
            continue

        step_output, step_lse = attend_block(builder, kernel, query, step_key, step_value, step_mask, scale, ndim,
                                             masked)
        if maybe_empty:
            empty = builder.call(aten.eq.Scalar, builder.call(
                aten.scalar_tensor.default, length, dtype=torch.int64, device=query_value.device), 0)
            step_lse = builder.call(aten.where.ScalarSelf, empty, float("-inf"), step_lse)
            step_output = builder.call(aten.where.ScalarSelf, empty, 0.0, step_output)
        output, log_sum_exp = merge(builder, output, log_sum_exp, step_output, step_lse, masked or may_be_empty)
        block, key, value, pending = _receive(builder, pending, same_kind, block, key, value, ndim)

    if training:
        # The same ring inside one op with a backward (ring_kernels.py): its collectives run eagerly in it.
        # Causal masks are built inside the op from positions, so backward keeps [Lq] + [Lk] integers per
        # step rather than an [Lq, Lk] mask.
        result = builder.call(differentiable_ops.ring_attention.default, query, key, value,
                              _every_step(step_masks), query_positions if causal and not isinstance(mask, fx.Node)
                              else None, _every_step(step_positions), block_lengths, scale, kernel, ring.rank,
                              ring.size, ring.group_name)
        output = builder.call(operator.getitem, result, 0)
    else:
        output = builder.call(aten._to_copy.default, output, dtype=query_value.dtype)
    if query_length is not None:
        output = builder.narrow(output, token_dim, 0, query_length)
    # Later passes (First Block Cache) find attention, and the module it belongs to, by these.
    mark_attention(output, node, "ring")
    if ulysses_size > 1:
        output = collectives.scatter_tokens_gather_heads(builder, output, head_dim, token_dim, ulysses, ndim)
        output = collectives.unpad_chunks(builder, output, query_layout, sequence)
    rewriter.bind_sharded(node, output, query_layout)
    inner = f"ulysses {ulysses_size} inside, " if ulysses_size > 1 else ""
    rewriter.report.attention.append(
        f"{name}: ring over {ring.size} ranks ({inner}{kernel} kernel, {heads} heads; query segments "
        f"{[str(s) for s in query_layout.segments]}, key segments {[str(s) for s in key_layout.segments]}"
        f"{', causal' if causal else ''}{', with mask' if isinstance(mask, fx.Node) else ''}"
        f"{'' if even_blocks else ', uneven blocks'}"
        f"{f'; training: one differentiable op, {backward_kernel(kernel)} backward' if training else ''})")


def _every_step(tensors):
    """One tensor per step for the op, or none: a step whose block is known empty has none, and the op
    reads none there, so any other step's stands in."""
    present = [tensor for tensor in tensors if tensor is not None]
    return [tensor if tensor is not None else present[0] for tensor in tensors] if present else []


def _receive(builder, pending, same_kind, block, key, value, ndim):
    """Waits for the block in flight, if any: it becomes the block in hand (`ndim`: the keys' dims)."""
    if pending is not None:
        if same_kind:
            block = collectives.wait_for_next_rank(builder, pending, ndim + 1)
        else:
            key, value = (collectives.wait_for_next_rank(builder, p, ndim) for p in pending)
    return block, key, value, None


def _scatter_heads(builder, tensor, ndim, layout, sequence, ulysses, head_dim, token_dim):
    padded = collectives.pad_to_chunks(builder, tensor, ndim, layout, sequence)
    return collectives.scatter_heads_gather_tokens(builder, padded, head_dim, token_dim, ulysses, ndim)


def _query_order(builder, tensor, dim, ndim, layout, sequence, my_ranks, ulysses_size):
    """Rows of a full tensor (mask, positions) in the order this rank's queries are in."""
    return collectives.select_shards(builder, tensor, layout.at_dim(dim), sequence, my_ranks,
                                     padded=ulysses_size > 1, ndim=ndim)


def mask_to_query_heads(builder, mask, mask_shape, heads, ulysses):
    """Under Ulysses this rank attends only its group of heads: keep that group's heads of a full mask."""
    head_dim = len(mask_shape) - 3
    if ulysses is None or head_dim < 0 or same_size(mask_shape[head_dim], 1):
        return mask
    per_rank = heads // ulysses.size if isinstance(heads, int) else builder.floordiv(builder.size(heads), ulysses.size)
    return builder.narrow(mask, head_dim, builder.mul(per_rank, ulysses.rank), per_rank)


def _same_shapes(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))
