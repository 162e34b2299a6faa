"""Following a residual stream back: where the value a DiT carries from block to block comes from.

Invariant: `residual_sources(node, stop)` returns only sources from which `node` is reached through
residual additions (`x + f(x)`), casts and shape-keeping views, and slices and concatenations that take
the source back whole, so a source it names holds the stream's value with `node`'s shape. Where a step
cannot be followed exactly (a strided slice, a slice along another dim), the walk stops there: a missed
source makes the caller give up (First Block Cache turns itself off), never pair the wrong values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from paracompile.passes.sharding_rules import passes_residual_through

aten = torch.ops.aten

RESIDUAL_ADD = {aten.add.Tensor, aten.add_.Tensor}
RESIDUAL_SUB = {aten.sub.Tensor, aten.sub_.Tensor}


def val(node: Any):
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def is_tensor(node: Any) -> bool:
    return isinstance(val(node), torch.Tensor)


def known_equal(a, b) -> bool:
    return statically_known_true(a == b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def known_less_equal(a, b) -> bool:
    return statically_known_true(a <= b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a <= b


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    first, second = val(a), val(b)
    return (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and first.dtype == second.dtype
            and first.dim() == second.dim() and all(known_equal(x, y) for x, y in zip(first.shape, second.shape)))


@dataclass(frozen=True, eq=False)
class _Window:
    """The part [start, end) along `dim` of a tensor that the value being followed came from."""

    dim: int
    start: Any
    end: Any


def residual_sources(node: fx.Node, stop: Callable[[fx.Node], bool]) -> list[tuple[fx.Node, bool]]:
    """Where the value `node` carries along its residual path comes from: walking back through residual
    additions (both same-shape operands of `add`, the first of `sub`), casts and views that keep the
    shape, and slices and concatenations (tracking which part of a concatenation a slice takes), up to the
    first nodes for which `stop` holds. Returns (source, passed an addition) for every source reached whole,
    with the same shape as `node`."""
    found: list[tuple[fx.Node, bool]] = []
    seen: set = set()
    frontier: list[tuple[fx.Node, Optional[_Window], bool]] = [(node, None, False)]
    while frontier:
        current, window, added = frontier.pop()
        # SymInt bounds are not hashable; their printed expressions identify them.
        key = (current, None if window is None else (window.dim, str(window.start), str(window.end)), added)
        if key in seen or not isinstance(current, fx.Node):
            continue
        seen.add(key)
        if current is not node and stop(current):
            if window is None and same_shape(current, node) and all(s is not current for s, _ in found):
                found.append((current, added))
            continue
        if current.op != "call_function" or not is_tensor(current):
            continue
        target, args = current.target, current.args
        if target in RESIDUAL_ADD or target in RESIDUAL_SUB:
            operands = args[:2] if target in RESIDUAL_ADD else args[:1]
            for operand in operands:
                if isinstance(operand, fx.Node) and is_tensor(operand) and _same_shape_any_dtype(operand, current):
                    frontier.append((operand, window, True))
        elif passes_residual_through(target):
            source = args[0]
            if isinstance(source, fx.Node) and is_tensor(source) and _same_shape_any_dtype(source, current):
                frontier.append((source, window, added))
        elif target is aten.slice.Tensor:
            frontier.extend(_through_slice(current, window, added))
        elif target is aten.cat.default:
            frontier.extend(_through_cat(current, window, added))
    return found


def _same_shape_any_dtype(a: fx.Node, b: fx.Node) -> bool:
    first, second = val(a), val(b)
    return first.dim() == second.dim() and all(known_equal(x, y) for x, y in zip(first.shape, second.shape))


def _normalized_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _through_slice(node: fx.Node, window: Optional[_Window], added: bool):
    source = node.args[0]
    ndim = val(source).dim()
    dim = _normalized_dim(node.args[1] if len(node.args) > 1 else 0, ndim)
    start = val(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
    end = val(node.args[3]) if len(node.args) > 3 and node.args[3] is not None else None
    step = node.args[4] if len(node.args) > 4 else 1
    size = val(source).shape[dim]
    if step != 1 or not isinstance(start, (int, torch.SymInt)):
        return []
    if end is None or (isinstance(end, int) and end >= 2 ** 62):
        end = size
    # Negative bounds count from the end (`x[:, :-text_length]`, HunyuanVideo's single blocks).
    start = start + size if known_less_equal(start + 1, 0) else start
    end = end + size if known_less_equal(end + 1, 0) else end
    if window is not None and window.dim != dim:
        return []  # a slice of a slice along another dim: not a residual stream
    if window is not None:
        start, end = start + window.start, start + window.end
    whole = known_equal(start, 0) and known_equal(end, size)
    return [(source, None if whole else _Window(dim, start, end), added)]


def _through_cat(node: fx.Node, window: Optional[_Window], added: bool):
    pieces = node.args[0]
    ndim = val(node).dim()
    dim = _normalized_dim(node.args[1] if len(node.args) > 1 else 0, ndim)
    if window is None or window.dim != dim:
        return []  # a stream is one piece of a concatenation, never all of it
    followed, offset = [], 0
    for piece in pieces:
        length = val(piece).shape[dim]
        piece_end = offset + length
        disjoint = known_less_equal(piece_end, window.start) or known_less_equal(window.end, offset)
        if not disjoint and not known_equal(length, 0):
            whole = known_equal(window.start, offset) and known_equal(window.end, piece_end)
            inner = None if whole else _Window(dim, window.start - offset, window.end - offset)
            followed.append((piece, inner, added))
        offset = piece_end
    return followed
