"""The token layout: how one tensor's token (sequence) axis is split over the sequence-parallel group.

A sharded token axis is a list of *segments* (text tokens, image tokens, ...). Every segment is split
across the ranks on its own, the way `torch.chunk` splits it: with chunk = ceil(length / ranks), rank r
holds elements [r * chunk, (r + 1) * chunk) of every segment, clipped to the segment's length (the last
ranks may hold fewer, even none). A rank's local tensor holds its pieces of all segments, in segment
order. So `cat` of two sharded tensors along the token axis is a local `cat` that appends segments, and
attention, which does not care about the order of its keys, can run on such concatenations directly.

Segment lengths are global sizes: ints, or SymInts of the ShapeEnv when Dynamo traced dynamic shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

Size = Union[int, torch.SymInt]


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """The token axis of a tensor sits at `dim` and is made of `segments`, each split over the ranks."""

    dim: int
    segments: tuple[Size, ...]

    @property
    def length(self) -> Size:
        return sum(self.segments[1:], self.segments[0])

    def at_dim(self, dim: int) -> "TokenLayout":
        return TokenLayout(dim, self.segments)

    def same_split(self, other: "TokenLayout") -> bool:
        """Whether both split the token axis the same way (the dims may differ)."""
        return len(self.segments) == len(other.segments) and all(
            same_size(a, b) for a, b in zip(self.segments, other.segments)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenLayout) and self.dim == other.dim and self.same_split(other)

    def key(self) -> tuple:
        """A hashable identity (SymInts are not hashable)."""
        return (self.dim, tuple(str(s) for s in self.segments))

    def describe(self) -> str:
        return f"dim {self.dim}, segments {[str(s) for s in self.segments]}"


def same_size(a: Size, b: Size) -> bool:
    """True only when the sizes are provably equal: an undecidable comparison counts as different."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def known_divisible(length: Size, ranks: int) -> bool:
    """True only when `length % ranks == 0` holds for every value the ShapeEnv allows."""
    if isinstance(length, int):
        return length % ranks == 0
    return statically_known_true(length % ranks == 0)


def known_nonnegative(size: Size) -> bool:
    """True only when `size >= 0` holds for every value the ShapeEnv allows (a negative pad crops)."""
    if isinstance(size, int):
        return size >= 0
    return statically_known_true(size >= 0)


def product(sizes: Sequence[Size]) -> Size:
    result: Size = 1
    for size in sizes:
        result = result * size
    return result
