"""Common subexpressions computed once, before the plan.

Invariant: the graph computes the same values as before; of two pure aten nodes that apply the same op to
the same arguments in the same block of the model's block loop, with no write to any tensor between them,
the later one is removed and its users read the earlier one.

Why before the plan: a model often computes the same thing from one tensor several times, and a rewrite
of each copy costs a collective apiece that nothing after it merges. torchao's float8 linears with
per-tensor scales are the case that matters: the query, key and value projections of one activation each
take the amax of |x| over its tokens, three partial maxima that the plan would all-reduce three times
(and quantize the activation three times); Inductor's graph CSE runs only in the training partitioner, so
an inference graph keeps all three. Merged here, one all-reduce serves all three projections.

Only within one block (or among nodes outside every block): every FLUX block computes silu(temb) for its
norm, and merged into block 0 it would make block 0 unlike its siblings (compile once per block would
compile it apart) and carry a value from block to block that the model does not.

What counts as pure: an aten or prims OpOverload whose schema writes no argument and which draws no random
numbers, and `operator.getitem`. A node that writes (an in-place op, `copy_`) or a call outside aten (grad
mode switches of a pre-dispatch trace) starts a new region: nodes of different regions are never merged,
so a value read before a write is never reused after it. Nodes whose value holds an unbacked symbol
(data-dependent sizes) stay as they are, as in torch's own graph CSE.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from paracompile.meta import VAL
from paracompile.passes.block_loop import block_of


def merge_common_subexpressions(gm: fx.GraphModule) -> int:
    """Merges repeated pure computations in place; returns how many nodes were removed."""
    graph = gm.graph
    seen: dict = {}
    region = 0
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if not _is_pure(node):
            if _may_write(node):
                region += 1
            continue
        if _holds_unbacked_symbols(node):
            continue
        try:
            key = (region, block_of(node), node.target, _hashable(node.args), _hashable(node.kwargs))
            hash(key)
        except TypeError:  # an argument that cannot be compared by value (a tensor constant, a callable)
            continue
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        removed += 1
    if removed:
        graph.lint()
        gm.recompile()
    return removed


def _is_pure(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or _is_output(node):
        return False
    return not target._schema.is_mutable and target is not torch.ops.aten.empty.memory_format


def _may_write(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return True  # a call outside aten (grad mode, a custom function): assume it may change state


def _is_output(node: fx.Node) -> bool:
    """What the graph returns stays distinct: two outputs that are separate tensors in eager stay separate."""
    return any(user.op == "output" for user in node.users)


def _holds_unbacked_symbols(node: fx.Node) -> bool:
    value = node.meta.get(VAL)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return bool(free_unbacked_symbols(value))
    if isinstance(value, torch.Tensor):
        return bool(free_unbacked_symbols(value.shape))
    return False


def _hashable(value):
    """Arguments as a hashable key: nodes by identity, containers by content, everything else as it is."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(item) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((key, _hashable(item)) for key, item in value.items())))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value.node.expr))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor constant")
    if isinstance(value, (bool, int, float, complex)):
        # By type too: 1, 1.0 and True are equal keys in Python but not equal arguments to an op (dtypes).
        return (type(value).__name__, "nan" if value != value else value)
    return value
