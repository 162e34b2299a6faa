"""In-place writes into temporaries nothing reads afterwards, made out of place.

Invariant: after `writes_out_of_place(graph)`, the graph computes what it computed; an in-place op
(`add_`, `sub_`, ...) whose written tensor is a temporary of the graph (not an input or constant) that no
alias reads after the write, and whose out-of-place overload gives the same shape and dtype, is that
out-of-place overload, with the same arguments and users.

Why: code like torchao's quantized linear ends in `y = (mm(x, w) * scale).reshape(...); y += bias`. Traced,
the `add_` writes through a `reshape` into the product's storage. The token pass must run such a write on
the storage later readers read; a `reshape` may copy, so it cannot tell that the shard's reshape is a view
of the shard's product, and it runs the write on the gathered full tensor (a gather per linear layer,
sharding_plan.py `_write_into_full_tensor`). When nothing but the op's own result is read afterwards, the
write is unobservable and `add` computes the same values without one.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def writes_out_of_place(graph: fx.Graph) -> int:
    """Rewrites the graph in place (see the module docstring); returns how many ops it changed."""
    order = {node: position for position, node in enumerate(graph.nodes)}
    changed = 0
    for node in graph.nodes:
        functional = _out_of_place_overload(node)
        if functional is None or not _same_shape_and_dtype(node):
            continue
        root = _alias_root(node.args[0])
        if root.op != "call_function":
            continue  # an input or a constant: the write is seen outside the graph, or by the next call
        read_later = any(order[user] > order[node] for alias in _aliases(root, node) for user in alias.users
                         if user is not node)
        if not read_later:
            node.target = functional
            changed += 1
    return changed


def _returns_alias(node: fx.Node) -> bool:
    """Whether `node`'s result may share storage with its first argument (views, `reshape`, `to`, in-place ops;
    the items of `split`)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and _returns_alias(node.args[0])
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    returns = node.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and bool(node.args) and isinstance(node.args[0], fx.Node)


def _alias_root(node: fx.Node) -> fx.Node:
    while _returns_alias(node):
        node = node.args[0]
    return node


def _aliases(root: fx.Node, write: fx.Node) -> list[fx.Node]:
    """`root` and every alias of it, except `write` and what is made from `write`'s result."""
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        found.append(current)
        frontier += [user for user in current.users
                     if user is not write and user not in found and _returns_alias(user) and user.args[0] is current]
    return found


def _out_of_place_overload(node: fx.Node) -> Optional[torch._ops.OpOverload]:
    """`aten.add.Tensor` for `aten.add_.Tensor`: the same overload, without the write, taking the same
    arguments; None for ops that write elsewhere than into their first argument."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    schema = target._schema
    written = [argument for argument in schema.arguments if argument.alias_info is not None and argument.alias_info.is_write]
    if len(written) != 1 or written[0] is not schema.arguments[0] or not isinstance(node.args[0], fx.Node):
        return None
    name = target.overloadpacket.__name__
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if functional is None or [a.name for a in functional._schema.arguments] != [a.name for a in schema.arguments]:
        return None
    return functional


def _same_shape_and_dtype(node: fx.Node) -> bool:
    """Whether the out-of-place op gives what the in-place one wrote: every tensor argument has the written
    tensor's dtype (no promotion) and broadcasts to its shape without growing it."""
    written = node.args[0].meta.get("val")
    if not isinstance(written, torch.Tensor):
        return False
    for argument in list(node.args[1:]) + list(node.kwargs.values()):
        value = argument.meta.get("val") if isinstance(argument, fx.Node) else argument
        if isinstance(value, torch.Tensor):
            if value.dtype != written.dtype or value.dim() > written.dim():
                return False
            for size, full in zip(reversed(value.shape), reversed(written.shape)):
                if not (statically_known_true(size == 1) or statically_known_true(size == full)):
                    return False
        elif isinstance(argument, fx.Node) or isinstance(value, (list, tuple)):
            return False  # a SymInt or a list argument: not worth reasoning about
    return True
