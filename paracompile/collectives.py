"""Graph fragments that move a token axis between layouts: slice, gather, and the Ulysses all-to-all.

Invariant: every function here adds to the builder's graph nodes that turn the layout it is given into
the layout it names, exactly (no token lost, duplicated or moved out of its order), for uneven segment
lengths too, including ranks that hold no tokens of a segment, and at every size the graph's guards admit.

Two kinds of fragment. The exchanges (the collective and the dim shuffles around it: an all-gather's,
an all-reduce's, Ulysses' all-to-alls, a ring step's send) read no size: each is a plain tensor function
below (`_gather_leading`, `_heads_out`, ...), traced once by make_fx and copied into the graph
(GraphBuilder.insert_traced). The layout ops around them (slice, pad, narrow, reorder by segment) are sized
by segment lengths that are symbolic under dynamic shapes; those are emitted by hand, with sizes computed by
the builder from the graph's symbolic inputs (make_fx cannot trace them: see graph_builder.trace_fragment).
Collectives are functional collectives (`_c10d_functional`), so they stay visible to Inductor, which can
schedule them against compute; in a graph compiled to train (a group marked `differentiable`), they are
paracompile's collectives with a backward (differentiable.py).

Padded rank-major order: to exchange shards of unequal length, each rank pads its piece of segment j to
chunk_j = ceil(length_j / ranks) tokens. A tensor that holds every rank's padded shard, rank after rank,
is in padded rank-major order; `rank_major_to_global` turns it into the global token order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from paracompile.differentiable import OPS as differentiable_ops
from paracompile.graph_builder import GraphBuilder, GraphSize
from paracompile.passes.token_layout import TokenLayout, known_divisible

aten = torch.ops.aten
functional = torch.ops._c10d_functional


@dataclass(frozen=True)
class ProcessGroupInfo:
    """One dimension of the mesh as the graph sees it: its size, this rank's place in it, its name."""

    size: int
    rank: int
    group_name: str
    # Emit collectives with a backward (paracompile/differentiable.py): the graph is compiled to train.
    differentiable: bool = False


class SegmentArithmetic:
    """Per-segment sizes of a layout on this rank, as values of the new graph."""

    def __init__(self, builder: GraphBuilder, layout: TokenLayout, group: ProcessGroupInfo):
        self.builder = builder
        self.layout = layout
        self.group = group
        self.lengths = [builder.size(s) for s in layout.segments]
        self.chunks = [builder.ceildiv(length, group.size) for length in self.lengths]

    @property
    def evenly_split(self) -> bool:
        return all(known_divisible(s, self.group.size) for s in self.layout.segments)

    def global_offsets(self) -> list[GraphSize]:
        return _running_offsets(self.builder, self.lengths)

    def chunk_offsets(self) -> list[GraphSize]:
        return _running_offsets(self.builder, self.chunks)

    def local_lengths(self) -> list[GraphSize]:
        return self.lengths_of_rank(self.group.rank)

    def lengths_of_rank(self, rank: int) -> list[GraphSize]:
        """How many tokens of each segment `rank` holds."""
        b = self.builder
        lengths = []
        for length, chunk in zip(self.lengths, self.chunks):
            remaining = b.sub(length, b.mul(chunk, rank))
            lengths.append(b.maximum(0, b.minimum(chunk, remaining)))
        return lengths

    def local_offsets(self) -> list[GraphSize]:
        return _running_offsets(self.builder, self.local_lengths())

    def local_length(self) -> GraphSize:
        return self.builder.total(self.local_lengths())


def _running_offsets(builder: GraphBuilder, sizes: list[GraphSize]) -> list[GraphSize]:
    offsets, running = [], 0
    for size in sizes:
        offsets.append(running)
        running = builder.add(running, size)
    return offsets


def slice_to_layout(builder: GraphBuilder, tensor: fx.Node, layout: TokenLayout, group: ProcessGroupInfo) -> fx.Node:
    """Replicated full tensor -> this rank's shard. Only slicing: no communication."""
    return select_shards(builder, tensor, layout, group, [group.rank])


def select_shards(builder: GraphBuilder, tensor: fx.Node, layout: TokenLayout, group: ProcessGroupInfo,
                  ranks: list[int], padded: bool = False, ndim: int = 0) -> fx.Node:
    """Replicated full tensor -> the shards of `ranks`, rank after rank, each in segment order; with
    `padded`, every segment piece zero-padded to its chunk length (padded rank-major order)."""
    sizes = SegmentArithmetic(builder, layout, group)
    pieces = []
    for rank in ranks:
        lengths = sizes.lengths_of_rank(rank) if padded else None
        for index, (offset, length, chunk) in enumerate(zip(sizes.global_offsets(), sizes.lengths, sizes.chunks)):
            segment = tensor
            if len(layout.segments) > 1:
                segment = builder.narrow(tensor, layout.dim, offset, length)
            start = builder.mul(chunk, rank)
            # aten.slice clamps start and end to the segment, which gives the ragged last shards.
            piece = builder.call(aten.slice.Tensor, segment, layout.dim, start, builder.add(start, chunk))
            if padded:
                piece = builder.pad_end(piece, layout.dim, ndim, builder.sub(chunk, lengths[index]))
            pieces.append(piece)
    return builder.cat(pieces, layout.dim)


def drop_padding(builder: GraphBuilder, tensor: fx.Node, layout: TokenLayout, group: ProcessGroupInfo,
                 ranks: list[int]) -> fx.Node:
    """Padded rank-major order of the shards of `ranks` -> the same tokens without the padding."""
    sizes = SegmentArithmetic(builder, layout, group)
    if sizes.evenly_split:
        return tensor
    per_rank = builder.total(sizes.chunks)
    pieces = []
    for position, rank in enumerate(ranks):
        base = builder.mul(per_rank, position)
        for offset, length in zip(sizes.chunk_offsets(), sizes.lengths_of_rank(rank)):
            pieces.append(builder.narrow(tensor, layout.dim, builder.add(base, offset), length))
    return builder.cat(pieces, layout.dim)


def shards_length(builder: GraphBuilder, layout: TokenLayout, group: ProcessGroupInfo, ranks: list[int]) -> GraphSize:
    """How many tokens the shards of `ranks` hold together."""
    sizes = SegmentArithmetic(builder, layout, group)
    return builder.total([length for rank in ranks for length in sizes.lengths_of_rank(rank)])


def pad_to_chunks(builder: GraphBuilder, tensor: fx.Node, ndim: int, layout: TokenLayout,
                  group: ProcessGroupInfo) -> fx.Node:
    """Local shard -> local shard with every segment piece zero-padded to its chunk length."""
    sizes = SegmentArithmetic(builder, layout, group)
    if sizes.evenly_split:
        return tensor
    pieces = []
    for offset, length, chunk in zip(sizes.local_offsets(), sizes.local_lengths(), sizes.chunks):
        piece = tensor if len(layout.segments) == 1 else builder.narrow(tensor, layout.dim, offset, length)
        pieces.append(builder.pad_end(piece, layout.dim, ndim, builder.sub(chunk, length)))
    return builder.cat(pieces, layout.dim)


def unpad_chunks(builder: GraphBuilder, tensor: fx.Node, layout: TokenLayout, group: ProcessGroupInfo) -> fx.Node:
    """Inverse of pad_to_chunks."""
    sizes = SegmentArithmetic(builder, layout, group)
    if sizes.evenly_split:
        return tensor
    pieces = [builder.narrow(tensor, layout.dim, offset, length)
              for offset, length in zip(sizes.chunk_offsets(), sizes.local_lengths())]
    return builder.cat(pieces, layout.dim)


def rank_major_to_global(builder: GraphBuilder, tensor: fx.Node, layout: TokenLayout,
                         group: ProcessGroupInfo) -> fx.Node:
    """Padded rank-major order along layout.dim -> global token order, padding dropped."""
    sizes = SegmentArithmetic(builder, layout, group)
    if len(layout.segments) == 1 and sizes.evenly_split:
        return tensor
    dim = layout.dim
    by_rank = builder.call(aten.unflatten.int, tensor, dim, [group.size, builder.total(sizes.chunks)])
    pieces = []
    for offset, chunk, length in zip(sizes.chunk_offsets(), sizes.chunks, sizes.lengths):
        piece = builder.narrow(by_rank, dim + 1, offset, chunk)
        piece = builder.call(aten.flatten.using_ints, piece, dim, dim + 1)
        pieces.append(builder.narrow(piece, dim, 0, length))
    return builder.cat(pieces, dim)


def global_to_rank_major(builder: GraphBuilder, tensor: fx.Node, ndim: int, layout: TokenLayout,
                         group: ProcessGroupInfo) -> fx.Node:
    """Global token order along layout.dim -> padded rank-major order (the inverse of the above)."""
    sizes = SegmentArithmetic(builder, layout, group)
    if len(layout.segments) == 1 and sizes.evenly_split:
        return tensor
    dim = layout.dim
    pieces = []
    for offset, length, chunk in zip(sizes.global_offsets(), sizes.lengths, sizes.chunks):
        piece = tensor if len(layout.segments) == 1 else builder.narrow(tensor, dim, offset, length)
        piece = builder.pad_end(piece, dim, ndim, builder.sub(builder.mul(chunk, group.size), length))
        pieces.append(builder.call(aten.unflatten.int, piece, dim, [group.size, chunk]))
    by_rank = builder.cat(pieces, dim + 1)
    return builder.call(aten.flatten.using_ints, by_rank, dim, dim + 1)


def gather(builder: GraphBuilder, tensor: fx.Node, ndim: int, layout: TokenLayout, group: ProcessGroupInfo) -> fx.Node:
    """This rank's shard -> the replicated full tensor in global order (one all-gather)."""
    padded = pad_to_chunks(builder, tensor, ndim, layout, group)
    gathered = builder.insert_traced(_gather_leading, [padded], [ndim], dim=layout.dim, ranks=group.size,
                                     group_name=group.group_name, differentiable=group.differentiable)
    ordered = rank_major_to_global(builder, gathered, layout.at_dim(0), group)
    return builder.call(aten.movedim.int, ordered, 0, layout.dim) if layout.dim != 0 else ordered


def _contiguous(tensor):
    """`aten.contiguous` as a node of the fragment, whatever the example's strides: `Tensor.contiguous()`
    returns a contiguous tensor without dispatching, so the trace would drop the op wherever the example
    happens to be contiguous, while the graph's tensor there may be a strided view (a shard sliced out of
    a permuted tensor, say) that the collective must not read as it is."""
    return aten.contiguous.default(tensor)


def _gather_leading(shard, *, dim, ranks, group_name, differentiable):
    """Every rank's `shard`, rank after rank along a new leading dim: `dim` moved to the front."""
    leading = _contiguous(shard.movedim(dim, 0) if dim != 0 else shard)
    if differentiable:
        return differentiable_ops.all_gather(leading, ranks, group_name)
    return functional.wait_tensor(functional.all_gather_into_tensor(leading, ranks, group_name))


def all_reduce(builder: GraphBuilder, tensor: fx.Node, ndim: int, group: ProcessGroupInfo,
               operation: str = "sum") -> fx.Node:
    """Every rank's partial result -> the full one on every rank (one all-reduce with `operation`: "sum",
    "max" or "min"). A graph compiled to train has a backward for the sum only; the token pass does not
    shard a max or min over tokens there."""
    assert operation == "sum" or not group.differentiable, f"no backward for an all-reduce with {operation}"
    return builder.insert_traced(_all_reduce, [tensor], [ndim], group_name=group.group_name,
                                 differentiable=group.differentiable, operation=operation)


def _all_reduce(partial, *, group_name, differentiable, operation):
    if differentiable:
        return differentiable_ops.all_reduce(partial, group_name)
    return functional.wait_tensor(functional.all_reduce(partial, operation, group_name))


def physical_order(shape, strides) -> list[int]:
    """The dims from outermost to innermost in memory (stride descending), size-1 dims left out: their stride
    says nothing about the layout. Symbolic sizes compare by their hints (this only decides a layout)."""
    def hint(value):
        if isinstance(value, torch.SymInt):
            return value.node.hint if value.node.hint is not None else 1
        return int(value)

    dims = [d for d in range(len(shape)) if hint(shape[d]) != 1]
    return sorted(dims, key=lambda d: (-hint(strides[d]), d))


def with_layout_of(builder: GraphBuilder, tensor: fx.Node, outermost_dim: int, original: torch.Tensor) -> fx.Node:
    """A gathered tensor (contiguous with `outermost_dim` moved to the front) with the memory layout the
    original graph's tensor has: the same dims in the same order in memory. Dense with that order, its
    strides are eager's, so a later `view` works as it does in eager and graph outputs keep their strides."""
    ndim = original.dim()
    want = physical_order(original.shape, original.stride())
    have = [d for d in [outermost_dim] + list(range(ndim)) if d in want]
    have = list(dict.fromkeys(have))
    if have == want:
        return tensor
    order = want + [d for d in range(ndim) if d not in want]  # size-1 dims anywhere
    return builder.insert_traced(_dense_in_order, [tensor], [ndim], order=tuple(order))


def _dense_in_order(tensor, *, order):
    """`tensor` copied dense with its dims in memory in `order` (outermost first), dims in place."""
    inverse = [order.index(d) for d in range(len(order))]
    return tensor.permute(list(order)).clone(memory_format=torch.contiguous_format).permute(inverse)


def send_to_next_rank(builder: GraphBuilder, tensor: fx.Node, ndim: int, group: ProcessGroupInfo) -> fx.Node:
    """Starts passing `tensor` one step round the ring (rank i sends to i + 1 and receives from i - 1).
    Returns the collective's pending result: `wait_for_next_rank` it later, after the compute it should
    overlap. One all_to_all_single with a single non-empty split each way is a permute that works on every
    backend (gloo included) and on tensors of any shape (the splits count slices of a new leading dim)."""
    if group.differentiable:
        # A graph compiled to train runs its ring inside paracompile::ring_attention (ring_kernels.py).
        raise NotImplementedError("paracompile: a ring transfer in a graph compiled to train has no backward; "
                                  "emit paracompile::ring_attention instead")
    return builder.insert_traced(_send_to_next_rank, [tensor], [ndim], rank=group.rank, ranks=group.size,
                                 group_name=group.group_name)


def _send_to_next_rank(tensor, *, rank, ranks, group_name):
    destination, source = (rank + 1) % ranks, (rank - 1) % ranks
    send = [1 if other == destination else 0 for other in range(ranks)]
    receive = [1 if other == source else 0 for other in range(ranks)]
    return functional.all_to_all_single(_contiguous(tensor).unsqueeze(0), receive, send, group_name)


def wait_for_next_rank(builder: GraphBuilder, pending: fx.Node, ndim: int) -> fx.Node:
    """The tensor `send_to_next_rank` received (`ndim`: the sent tensor's dims)."""
    return builder.insert_traced(_wait_for_next_rank, [pending], [ndim + 1])


def _wait_for_next_rank(pending):
    return functional.wait_tensor(pending).squeeze(0)


def _start_all_to_all(tensor, ranks: int, group_name: str, differentiable: bool):
    """Inside a fragment: starts an all-to-all over a leading dim of size `ranks` (slice i goes to rank i,
    slot i comes from rank i); the pending result is waited for by `_finish_all_to_all`, after the compute
    it should overlap. The differentiable all-to-all is synchronous: its result is final."""
    splits = [1] * ranks
    if differentiable:
        return differentiable_ops.all_to_all(_contiguous(tensor), splits, splits, group_name)
    return functional.all_to_all_single(_contiguous(tensor), splits, splits, group_name)


def _finish_all_to_all(pending, differentiable: bool):
    return pending if differentiable else functional.wait_tensor(pending)


class Exchange:
    """An all-to-all that splits one dim over the ranks and gathers another, in two halves: `start` issues
    it, `finish` waits for it and lays the result out. [.., A, .., B, ..] with A at `split_dim` ->
    [.., A / ranks, .., ranks * B, ..]: slice r of A goes to rank r, and what rank r sent lands at block r of
    B. Ulysses' second all-to-all splits tokens and gathers heads (its first is HeadsOut's)."""

    def __init__(self, builder: GraphBuilder, split_dim: int, gather_dim: int, ndim: int, group: ProcessGroupInfo):
        self.builder, self.split_dim, self.gather_dim, self.ndim, self.group = builder, split_dim, gather_dim, ndim, group

    def start(self, tensor: fx.Node) -> fx.Node:
        return self.builder.insert_traced(_split_dim_out, [tensor], [self.ndim], split_dim=self.split_dim,
                                          ranks=self.group.size, group_name=self.group.group_name,
                                          differentiable=self.group.differentiable)

    def finish(self, pending: fx.Node) -> fx.Node:
        return self.builder.insert_traced(_gather_dim_in, [pending], [self.ndim + 1], gather_dim=self.gather_dim,
                                          differentiable=self.group.differentiable)


def _split_dim_out(tensor, *, split_dim, ranks, group_name, differentiable):
    by_rank = tensor.unflatten(split_dim, [ranks, -1]).movedim(split_dim, 0)
    return _start_all_to_all(by_rank, ranks, group_name, differentiable)


def _gather_dim_in(pending, *, gather_dim, differentiable):
    exchanged = _finish_all_to_all(pending, differentiable)
    # dims are now [source rank, ..., A / ranks (at split_dim + 1), ..., B (at gather_dim + 1), ...]
    return exchanged.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class HeadsOut:
    """Ulysses' first all-to-all, for one or more tensors of one shape (q, k and v in one message): each
    [.., H, .., C, ..] (this rank's C padded tokens, all heads) -> [.., H / ranks, .., ranks * C, ..] (head
    group r of every rank's tokens, in padded rank-major order).

    What is sent is laid out [ranks, C, tensor, the other dims], built by one `cat` of the tensors' permuted
    views, so Inductor has the kernels that compute q, k and v write straight into the message (a stack
    followed by a permuted copy cost a kernel of its own). What arrives is then [source rank, C, tensor,
    ...]: source rank and C are neighbours in memory, so each result is a view of the received buffer with
    tokens outermost, a layout attention kernels read as it is: no copy between the exchange and attention
    (with the rank dim in front of the heads there was one per tensor)."""

    def __init__(self, builder: GraphBuilder, head_dim: int, token_dim: int, ndim: int, group: ProcessGroupInfo):
        self.builder, self.head_dim, self.token_dim, self.ndim, self.group = builder, head_dim, token_dim, ndim, group

    def start(self, tensors: list[fx.Node]) -> fx.Node:
        return self.builder.insert_traced(_heads_out, tensors, [self.ndim] * len(tensors), head_dim=self.head_dim,
                                          token_dim=self.token_dim, ranks=self.group.size,
                                          group_name=self.group.group_name, differentiable=self.group.differentiable)

    def finish(self, pending: fx.Node, count: int) -> list[fx.Node]:
        return self.builder.insert_traced(_heads_in, [pending], [self.ndim + 2], count=count,
                                          token_dim=self.token_dim, differentiable=self.group.differentiable)


def _heads_out(*tensors, head_dim, token_dim, ranks, group_name, differentiable):
    ndim = tensors[0].dim()
    token = token_dim + (1 if token_dim > head_dim else 0)  # once heads are [ranks, H / ranks]
    order = [head_dim, token] + [d for d in range(ndim + 1) if d not in (head_dim, token)]
    pieces = [tensor.unflatten(head_dim, [ranks, -1]).permute(order).unsqueeze(2) for tensor in tensors]
    message = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
    return _start_all_to_all(message, ranks, group_name, differentiable)


def _heads_in(pending, *, count, token_dim, differentiable):
    received = _finish_all_to_all(pending, differentiable).flatten(0, 1)  # [ranks * C, count, ...]
    return [received.select(1, index).movedim(0, token_dim) for index in range(count)]


def scatter_heads_gather_tokens(builder: GraphBuilder, tensor: fx.Node, head_dim: int, token_dim: int,
                                group: ProcessGroupInfo, ndim: int) -> fx.Node:
    """Ulysses' first all-to-all for one tensor (HeadsOut)."""
    exchange = HeadsOut(builder, head_dim, token_dim, ndim, group)
    return exchange.finish(exchange.start([tensor]), 1)[0]


def scatter_tokens_gather_heads(builder: GraphBuilder, tensor: fx.Node, head_dim: int, token_dim: int,
                                group: ProcessGroupInfo, ndim: int) -> fx.Node:
    """Ulysses' second all-to-all, the inverse of scatter_heads_gather_tokens."""
    exchange = Exchange(builder, token_dim, head_dim, ndim, group)
    return exchange.finish(exchange.start(tensor))
