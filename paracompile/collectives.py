"""Graph fragments that move a token axis between layouts: slice, gather, and the Ulysses all-to-all.

Every function here emits nodes through a GraphBuilder and works for uneven segment lengths, including
ranks that hold no tokens of a segment. Collectives are functional collectives (`_c10d_functional`), so
they stay visible to Inductor, which can schedule them against compute; in a graph compiled to train (a
group marked `differentiable`), they are paracompile's collectives with a backward (differentiable.py).

Padded rank-major order: to exchange shards of unequal length, each rank pads its piece of segment j to
chunk_j = ceil(length_j / ranks) tokens. A tensor that holds every rank's padded shard, rank after rank,
is in padded rank-major order; `rank_major_to_global` turns it into the global token order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from paracompile.differentiable import OPS as differentiable
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
    leading = builder.call(aten.movedim.int, padded, layout.dim, 0) if layout.dim != 0 else padded
    leading = builder.call(aten.contiguous.default, leading)
    if group.differentiable:
        gathered = builder.call(differentiable.all_gather.default, leading, group.size, group.group_name)
    else:
        gathered = builder.call(functional.all_gather_into_tensor.default, leading, group.size, group.group_name)
        gathered = builder.call(functional.wait_tensor.default, gathered)
    ordered = rank_major_to_global(builder, gathered, layout.at_dim(0), group)
    return builder.call(aten.movedim.int, ordered, 0, layout.dim) if layout.dim != 0 else ordered


def all_reduce(builder: GraphBuilder, tensor: fx.Node, group: ProcessGroupInfo, operation: str = "sum") -> fx.Node:
    """Every rank's partial result -> the full one on every rank (one all-reduce with `operation`: "sum",
    "max" or "min"). A graph compiled to train has a backward for the sum only; the token pass does not
    shard a max or min over tokens there."""
    if group.differentiable:
        assert operation == "sum", f"no backward for an all-reduce with {operation}"
        return builder.call(differentiable.all_reduce.default, tensor, group.group_name)
    reduced = builder.call(functional.all_reduce.default, tensor, operation, group.group_name)
    return builder.call(functional.wait_tensor.default, reduced)


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
    inverse = [order.index(d) for d in range(ndim)]
    permuted = builder.call(aten.permute.default, tensor, order)
    dense = builder.call(aten.clone.default, permuted, memory_format=torch.contiguous_format)
    return builder.call(aten.permute.default, dense, inverse)


def send_to_next_rank(builder: GraphBuilder, tensor: fx.Node, group: ProcessGroupInfo) -> fx.Node:
    """Starts passing `tensor` one step round the ring (rank i sends to i + 1 and receives from i - 1).
    Returns the collective's pending result: `wait_tensor` it later, after the compute it should overlap.
    One all_to_all_single with a single non-empty split each way is a permute that works on every
    backend (gloo included) and on tensors of any shape (the splits count slices of a new leading dim)."""
    if group.differentiable:
        raise NotImplementedError("paracompile: ring attention has no backward yet")
    destination, source = (group.rank + 1) % group.size, (group.rank - 1) % group.size
    send = [1 if rank == destination else 0 for rank in range(group.size)]
    receive = [1 if rank == source else 0 for rank in range(group.size)]
    leading = builder.call(aten.unsqueeze.default, builder.call(aten.contiguous.default, tensor), 0)
    return builder.call(functional.all_to_all_single.default, leading, receive, send, group.group_name)


def wait_for_next_rank(builder: GraphBuilder, pending: fx.Node) -> fx.Node:
    return builder.call(aten.squeeze.dim, builder.call(functional.wait_tensor.default, pending), 0)


def start_all_to_all(builder: GraphBuilder, tensor: fx.Node, group: ProcessGroupInfo) -> fx.Node:
    """Starts an all-to-all over a leading dim of size group.size (slice i goes to rank i, slot i comes from
    rank i); returns the pending result for `finish_all_to_all`, after the compute it should overlap."""
    tensor = builder.call(aten.contiguous.default, tensor)
    splits = [1] * group.size
    if group.differentiable:  # synchronous: the result is final, finish_all_to_all leaves it as it is
        return builder.call(differentiable.all_to_all.default, tensor, splits, splits, group.group_name)
    return builder.call(functional.all_to_all_single.default, tensor, splits, splits, group.group_name)


def finish_all_to_all(builder: GraphBuilder, pending: fx.Node) -> fx.Node:
    if pending.target is differentiable.all_to_all.default:
        return pending
    return builder.call(functional.wait_tensor.default, pending)


def all_to_all(builder: GraphBuilder, tensor: fx.Node, group: ProcessGroupInfo) -> fx.Node:
    return finish_all_to_all(builder, start_all_to_all(builder, tensor, group))


class Exchange:
    """An all-to-all that splits one dim over the ranks and gathers another, in two halves: `start` issues
    it, `finish` waits for it and lays the result out. [.., A, .., B, ..] with A at `split_dim` ->
    [.., A / ranks, .., ranks * B, ..]: slice r of A goes to rank r, and what rank r sent lands at block r of
    B. Ulysses' second all-to-all splits tokens and gathers heads (its first is HeadsOut's)."""

    def __init__(self, builder: GraphBuilder, split_dim: int, gather_dim: int, group: ProcessGroupInfo):
        self.builder, self.split_dim, self.gather_dim, self.group = builder, split_dim, gather_dim, group

    def start(self, tensor: fx.Node) -> fx.Node:
        by_rank = self.builder.call(aten.unflatten.int, tensor, self.split_dim, [self.group.size, -1])
        return start_all_to_all(self.builder, self.builder.call(aten.movedim.int, by_rank, self.split_dim, 0),
                                self.group)

    def finish(self, pending: fx.Node) -> fx.Node:
        exchanged = finish_all_to_all(self.builder, pending)
        # dims are now [source rank, ..., A / ranks (at split_dim + 1), ..., B (at gather_dim + 1), ...]
        rank_next_to_gathered = self.builder.call(aten.movedim.int, exchanged, 0, self.gather_dim)
        return self.builder.call(aten.flatten.using_ints, rank_next_to_gathered, self.gather_dim, self.gather_dim + 1)


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
        b = self.builder
        token = self.token_dim + (1 if self.token_dim > self.head_dim else 0)  # once heads are [ranks, H / ranks]
        order = [self.head_dim, token] + [d for d in range(self.ndim + 1) if d not in (self.head_dim, token)]
        pieces = [b.call(aten.unsqueeze.default, b.call(aten.permute.default, b.call(
            aten.unflatten.int, tensor, self.head_dim, [self.group.size, -1]), order), 2) for tensor in tensors]
        return start_all_to_all(b, b.cat(pieces, 2), self.group)

    def finish(self, pending: fx.Node, count: int) -> list[fx.Node]:
        b = self.builder
        received = b.call(aten.flatten.using_ints, finish_all_to_all(b, pending), 0, 1)  # [ranks * C, count, ...]
        return [b.call(aten.movedim.int, b.call(aten.select.int, received, 1, index), 0, self.token_dim)
                for index in range(count)]


def scatter_heads_gather_tokens(builder: GraphBuilder, tensor: fx.Node, head_dim: int, token_dim: int,
                                group: ProcessGroupInfo, ndim: int) -> fx.Node:
    """Ulysses' first all-to-all for one tensor (HeadsOut)."""
    exchange = HeadsOut(builder, head_dim, token_dim, ndim, group)
    return exchange.finish(exchange.start([tensor]), 1)[0]


def scatter_tokens_gather_heads(builder: GraphBuilder, tensor: fx.Node, head_dim: int, token_dim: int,
                                group: ProcessGroupInfo) -> fx.Node:
    """Ulysses' second all-to-all, the inverse of scatter_heads_gather_tokens."""
    exchange = Exchange(builder, token_dim, head_dim, group)
    return exchange.finish(exchange.start(tensor))
