"""Attention on token shards: picks the strategy per attention node; Ulysses itself lives here.

With a ring degree above 1, self-attention goes to ring_attention.py (Ulysses inside each ring step when
the Ulysses degree is above 1 too); the rest of this docstring is about the Ulysses-only mesh.

Invariant: the rewritten attention returns this rank's shard of exactly the output the original node
computes on full tensors (or the full output, where it falls back to replicated attention).

- q, k and v token-sharded (self or joint attention): Ulysses. One all-to-all per tensor scatters heads
  and gathers tokens, attention runs on this rank's heads over all tokens, and one all-to-all brings the
  output back to token shards. Keys only need to be in a consistent order (attention does not care about
  key order, and is equivariant in queries), so tensors stay in padded rank-major order unless padding
  must be dropped (keys of uneven shards) or a mask or `is_causal` needs true positions.
- q sharded, k and v replicated (cross-attention to text): local attention, no communication.
- the token axis in a leading (batch or heads) dim of attention, as in factorised spatial/temporal video
  attention: each rank attends its own rows, no communication.
- anything else: gather and run the original attention replicated, and say why in the report.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from paracompile import collectives
from paracompile.explain import describe_node
from paracompile.meta import copy_origin, mark_attention
from paracompile.passes.ring_attention import mask_to_query_heads, ring_attention
from paracompile.passes.sharding_plan import AttentionSite
from paracompile.passes.sharding_rules import OpView
from paracompile.passes.token_layout import known_divisible, same_size

aten = torch.ops.aten


class HeadCountError(ValueError):
    pass


class SequenceAttention:
    """The attention strategy of the sequence mesh: `plan` decides what an attention node becomes from its
    inputs' layouts alone (the sharding plan asks it before the rewrite); calling it rewrites the node
    accordingly. `strict`: the mesh named its Ulysses degree, so a head count it does not divide is an
    error rather than a replicated attention."""

    def __init__(self, mesh, ulysses_chunks: int = 1):
        self.mesh = mesh
        self.ulysses_chunks = ulysses_chunks
        self.strict = bool(mesh.explicit)

    def plan(self, node: fx.Node, layout_of) -> AttentionSite:
        view = OpView(node, layout_of)
        query = view["query"]
        layouts = [view.layout(name) for name in ("query", "key", "value")]
        ndim = len(view.shape(query))
        token_dim, head_dim = ndim - 2, ndim - 3

        def replicated(reason: str) -> AttentionSite:
            return AttentionSite("replicated", reason)

        if all(layout is None for layout in layouts):
            return replicated("no input is token-sharded")
        if ndim >= 3 and all(layout is None or layout.dim < token_dim for layout in layouts):
            return _split_rows(view, layouts, ndim, replicated)
        if any(layout is not None and layout.dim != token_dim for layout in layouts) or ndim < 3:
            return replicated("the token axis is not the sequence dim of attention")
        if view["dropout_p"] not in (0, 0.0):
            return replicated("attention dropout is random: sharding would change which elements are dropped")
        query_layout, key_layout, value_layout = layouts
        if query_layout is not None and key_layout is None and value_layout is None:
            if view["is_causal"]:
                return replicated("is_causal with sharded queries and full keys")
            inputs = {"query": query_layout}
            mask = view["attn_mask"]
            if isinstance(mask, fx.Node):
                mask_query_dim = len(view.shape(mask)) - 2
                if mask_query_dim >= 0 and not same_size(view.shape(mask)[mask_query_dim], 1):
                    inputs["attn_mask"] = query_layout.at_dim(mask_query_dim)
            return AttentionSite("local", inputs=inputs, output=query_layout)
        if query_layout is None or key_layout is None or value_layout is None:
            return replicated("queries and keys/values are split differently")
        heads = view.shape(query)[head_dim]
        ulysses_size = self.mesh.ulysses.size if self.mesh.ulysses is not None else 1
        if not known_divisible(heads, ulysses_size):
            if self.strict:
                raise HeadCountError(
                    f"paracompile: {describe_node(node)} has {heads} attention heads, which the Ulysses degree "
                    f"{ulysses_size} does not divide. Use a Ulysses degree that divides the head count, or "
                    "mesh='auto'.")
            return replicated(f"{heads} heads are not divisible by the Ulysses degree {ulysses_size}")
        if self.mesh.ring is not None:
            # In a graph compiled to train too: the ring then runs inside a differentiable op (ring_attention.py).
            if ndim != 4:
                return replicated("ring attention needs [batch, heads, tokens, head size] inputs")
            # A ring step sends a key block with its value block, token for token: values split another way
            # are re-cut to the keys' split.
            return AttentionSite("ring", inputs={"query": query_layout, "key": key_layout,
                                                 "value": key_layout.at_dim(value_layout.dim)}, output=query_layout)
        return AttentionSite("ulysses", inputs={"query": query_layout, "key": key_layout, "value": value_layout},
                             output=query_layout)

    def __call__(self, rewriter, node: fx.Node) -> None:
        site = self.plan(node, rewriter.layout_of)
        view = OpView(node, rewriter.layout_of)
        # The layouts the site uses its inputs with (the ring's values re-cut to the keys' split among them).
        layouts = [site.inputs.get(name) for name in ("query", "key", "value")]
        if site.kind == "replicated":
            _replicated_attention(rewriter, node, view, site.reason)
        elif site.kind == "local":
            _local_attention(rewriter, node, view, site)
        elif site.kind == "ring":
            ring_attention(rewriter, node, view, layouts, view.shape(view["query"])[-3])
        else:
            ndim = len(view.shape(view["query"]))
            heads, key_heads = view.shape(view["query"])[ndim - 3], view.shape(view["key"])[ndim - 3]
            _ulysses(rewriter, node, view, layouts, heads, key_heads, self.ulysses_chunks)


def _split_rows(view: OpView, layouts, ndim: int, replicated) -> AttentionSite:
    """The token axis is one of attention's leading dims (its batch or heads): a model that attends along
    another axis of its tokens (Latte's temporal blocks attend across frames, one row per image patch; its
    spatial blocks across patches, one row per frame). Every row attends on its own, so each rank attends
    its rows of q, k, v and the mask, with no communication; inputs without the dim, or with size 1 there
    (broadcast), stay whole."""
    reference = next(layout for layout in layouts if layout is not None)
    if view["dropout_p"] not in (0, 0.0):
        return replicated("attention dropout is random: sharding would change which elements are dropped")
    if reference.dim == ndim - 3 and view["enable_gqa"]:
        return replicated("the token axis is the head dim of grouped-query attention")
    inputs = {}
    for name in ("query", "key", "value", "attn_mask"):
        tensor = view[name]
        if not isinstance(tensor, fx.Node):
            continue
        shape = view.shape(tensor)
        dim = reference.dim - (ndim - len(shape))
        if dim < 0 or same_size(shape[dim], 1):
            if name == "query":
                return replicated("the queries broadcast over the split dim")
            if view.layout(name) is not None:
                return replicated("the inputs of attention are split along different dims")
            continue
        inputs[name] = reference.at_dim(dim)
    return AttentionSite("local", reason=f"split along dim {reference.dim}, one of its rows per rank: no communication",
                         inputs=inputs, output=reference)


def _replicated_attention(rewriter, node, view, reason: str) -> None:
    """The original attention on full tensors, gathered where they are sharded."""
    name = describe_node(node)
    args = dict(view.args)
    for tensor_name in ("query", "key", "value", "attn_mask"):
        if isinstance(args[tensor_name], fx.Node):
            args[tensor_name] = rewriter.replicated(args[tensor_name], f"{name}: {reason}")
    new = rewriter.emit(node.target, args)
    copy_origin(new, node)
    rewriter.bind_replicated(node, new)
    rewriter.report.attention.append(f"{name}: replicated ({reason})")


def _local_attention(rewriter, node, view, site: AttentionSite) -> None:
    """Sharded queries against full keys and values, the mask's query rows sharded where it has them (the
    layouts `site` gives)."""
    args = dict(view.args)
    for name in ("query", "key", "value", "attn_mask"):
        if isinstance(args[name], fx.Node):
            layout = site.inputs.get(name)
            args[name] = (rewriter.sharded(view[name], layout, describe_node(node)) if layout is not None
                          else rewriter.replicated(view[name], describe_node(node)))
    new = rewriter.emit(node.target, args)
    rewriter.bind_sharded(node, new, site.output)
    rewriter.report.attention.append(
        f"{describe_node(node)}: local ({site.reason or 'keys/values replicated, queries sharded: no communication'})")


def _ulysses(rewriter, node, view, layouts, heads, key_heads, chunks: int = 1) -> None:
    builder, group = rewriter.builder, rewriter.group
    name = describe_node(node)
    query_layout, key_layout, value_layout = layouts
    ndim = len(view.shape(view["query"]))
    token_dim, head_dim = ndim - 2, ndim - 3
    mask = view["attn_mask"]
    causal = bool(view["is_causal"])
    enable_gqa = bool(view["enable_gqa"])

    mask_needs_query_order = mask_needs_key_order = False
    local_mask = None
    if isinstance(mask, fx.Node):
        mask_shape = view.shape(mask)
        local_mask = rewriter.replicated(mask, f"{name}: attention masks are applied over all tokens")
        mask_needs_query_order = len(mask_shape) >= 2 and not same_size(mask_shape[-2], 1)
        mask_needs_key_order = len(mask_shape) >= 1 and not same_size(mask_shape[-1], 1)
        local_mask = mask_to_query_heads(builder, local_mask, mask_shape, heads, group)

    query_local = rewriter.sharded(view["query"], query_layout, name)
    key_local = rewriter.sharded(view["key"], key_layout, name)
    value_local = rewriter.sharded(view["value"], value_layout, name)
    repeated_heads = False
    if enable_gqa and not same_size(heads, key_heads) and not known_divisible(key_heads, group.size):
        # Each rank needs whole groups of key heads: repeat them up to the query head count.
        repeats = heads // key_heads
        key_local = builder.call(aten.repeat_interleave.self_int, key_local, repeats, head_dim)
        value_local = builder.call(aten.repeat_interleave.self_int, value_local, repeats, head_dim)
        enable_gqa = False
        repeated_heads = True

    def exchange(local, layout, global_order: bool):
        padded = collectives.pad_to_chunks(builder, local, ndim, layout, group)
        gathered = collectives.scatter_heads_gather_tokens(builder, padded, head_dim, token_dim, group, ndim)
        if global_order:
            gathered = collectives.rank_major_to_global(builder, gathered, layout, group)
        return gathered

    keys_uneven = not all(known_divisible(s, group.size) for s in key_layout.segments + value_layout.segments)
    query_in_global_order = causal or mask_needs_query_order
    keys_in_global_order = causal or mask_needs_key_order or keys_uneven
    if not keys_in_global_order and not key_layout.same_split(value_layout):
        keys_in_global_order = True  # keys and values must line up token for token
    fused = (_same_shapes(view, ("query", "key", "value")) and query_layout.same_split(key_layout)
             and key_layout.same_split(value_layout) and key_local is not None and not repeated_heads)
    per_chunk = heads // (group.size * chunks) if isinstance(heads, int) else 0
    chunked = (fused and chunks > 1 and per_chunk > 0 and heads % (group.size * chunks) == 0
               and (local_mask is None or _mask_heads(view.shape(mask)) is None
                    or same_size(_mask_heads(view.shape(mask)), 1) or same_size(_mask_heads(view.shape(mask)), heads)))
    if fused:
        # One all-to-all for all three (per chunk of heads): fewer, larger messages.
        output = _fused_exchange(rewriter, node, view, (query_local, key_local, value_local), query_layout,
                                 key_layout, value_layout, local_mask, chunks if chunked else 1, per_chunk,
                                 query_in_global_order, keys_in_global_order, enable_gqa)
    else:
        query_all = exchange(query_local, query_layout, query_in_global_order)
        key_all = exchange(key_local, key_layout, keys_in_global_order)
        value_all = exchange(value_local, value_layout, keys_in_global_order)
        output = _attend(rewriter, node, view, query_all, key_all, value_all, local_mask, enable_gqa, "ulysses")
        if query_in_global_order:
            output = collectives.global_to_rank_major(builder, output, ndim, query_layout, group)
        output = collectives.scatter_tokens_gather_heads(builder, output, head_dim, token_dim, group, ndim)
    output = collectives.unpad_chunks(builder, output, query_layout, group)
    rewriter.bind_sharded(node, output, query_layout)
    order = "global token order" if (query_in_global_order or keys_in_global_order) else "rank-major token order"
    overlap = f"; {chunks} head chunks, each one's exchange overlapping another's attention" if chunked else ""
    rewriter.report.attention.append(
        f"{name}: ulysses over {group.size} ranks ({heads} heads, {heads // group.size if isinstance(heads, int) else '?'}"
        f" per rank; query segments {[str(s) for s in query_layout.segments]}, key segments "
        f"{[str(s) for s in key_layout.segments]}; {order}{', causal' if causal else ''}"
        f"{', with mask' if local_mask is not None else ''}{overlap})")


def _mask_heads(mask_shape):
    """The size of a mask's head dim (None when it has none)."""
    return mask_shape[-3] if len(mask_shape) >= 3 else None


def _attend(rewriter, node, view, query, key, value, mask, enable_gqa, kind: str) -> fx.Node:
    """The original attention op on exchanged inputs, with the node's module stack (later passes find
    attention and its module by it)."""
    args = dict(view.args)
    args.update(query=query, key=key, value=value, attn_mask=mask, enable_gqa=enable_gqa)
    output = rewriter.emit(node.target, args)
    return mark_attention(output, node, kind)


def _fused_exchange(rewriter, node, view, local, query_layout, key_layout, value_layout, local_mask, chunks,
                    per_chunk, query_in_global_order, keys_in_global_order, enable_gqa):
    """Ulysses with q, k and v in one all-to-all (collectives.HeadsOut), and with this rank's heads in `chunks` chunks:
    every chunk's all-to-all is issued first; then per chunk, wait for its exchange, attend, and issue its
    output all-to-all; then wait for those. A chunk's attention runs while the next chunk's inputs and the
    previous chunk's output are in flight.

    Heads split as [ranks, chunks, per_chunk]: chunk j sends heads (r, j, :) to rank r, so rank r attends
    heads r * chunks * per_chunk + j * per_chunk + [0, per_chunk) of its group; the outputs come back as
    (source rank, head) per chunk and are put back in the global head order."""
    builder, group = rewriter.builder, rewriter.group
    ndim = len(view.shape(view["query"]))
    token_dim, head_dim = ndim - 2, ndim - 3
    padded = [collectives.pad_to_chunks(builder, t, ndim, query_layout, group) for t in local]
    if chunks == 1:
        pieces = [padded]
    else:
        def heads_of_chunk(tensor, chunk):
            by_chunk = builder.call(aten.unflatten.int, tensor, head_dim, [group.size, chunks, per_chunk])
            return builder.call(aten.flatten.using_ints, builder.call(aten.select.int, by_chunk, head_dim + 1, chunk),
                                head_dim, head_dim + 1)
        pieces = [[heads_of_chunk(t, chunk) for t in padded] for chunk in range(chunks)]
    inbound = collectives.HeadsOut(builder, head_dim, token_dim, ndim, group)
    pending_in = [inbound.start(piece) for piece in pieces]
    outbound = collectives.Exchange(builder, token_dim, head_dim, ndim, group)  # tokens out, heads back
    pending_out = []
    mask_heads = _mask_heads(view.shape(view["attn_mask"])) if local_mask is not None else None
    for chunk in range(chunks):
        query_all, key_all, value_all = inbound.finish(pending_in[chunk], 3)
        if query_in_global_order:
            query_all = collectives.rank_major_to_global(builder, query_all, query_layout, group)
        if keys_in_global_order:
            key_all = collectives.rank_major_to_global(builder, key_all, key_layout, group)
            value_all = collectives.rank_major_to_global(builder, value_all, value_layout, group)
        mask = local_mask
        if chunks > 1 and mask_heads is not None and not same_size(mask_heads, 1):
            mask = builder.narrow(local_mask, len(view.shape(view["attn_mask"])) - 3, chunk * per_chunk, per_chunk)
        output = _attend(rewriter, node, view, query_all, key_all, value_all, mask, enable_gqa,
                         "ulysses" if chunks == 1 else "ulysses_chunked")
        if query_in_global_order:
            output = collectives.global_to_rank_major(builder, output, ndim, query_layout, group)
        pending_out.append(outbound.start(output))
    outputs = [outbound.finish(pending) for pending in pending_out]  # heads (source rank, head) per chunk
    if chunks == 1:
        return outputs[0]
    by_chunk = builder.call(aten.stack.default, outputs, head_dim)
    by_chunk = builder.call(aten.unflatten.int, by_chunk, head_dim + 1, [group.size, per_chunk])
    ranks_first = builder.call(aten.transpose.int, by_chunk, head_dim, head_dim + 1)
    return builder.call(aten.flatten.using_ints, ranks_first, head_dim, head_dim + 2)


def _same_shapes(view: OpView, names) -> bool:
    values = [view[name].meta["val"] for name in names]
    first = values[0]
    return all(v.dtype == first.dtype and len(v.shape) == len(first.shape)
               and all(same_size(a, b) for a, b in zip(v.shape, first.shape)) for v in values[1:])
