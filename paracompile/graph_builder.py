"""Emitting nodes into the rewritten graph.

Invariant: every node this module adds computes, at every shape the rewritten graph's guards admit, what
the code that asked for it says: a size computed from the graph's own symbolic inputs, or the ops of a
traced fragment in the order the fragment calls them.

Two ways in. By hand (`call`, and the size arithmetic): sizes come from the original graph's metadata as
ints or SymInts; in the rewritten graph an int stays a constant and a SymInt becomes nodes computed from the
graph's own symbolic inputs (its sympy expression interpreted by torch's `sympy_interp`). The arithmetic
folds constants, so graphs with static shapes keep static sizes, which Inductor prefers. Traced
(`insert_traced`): a fragment written as plain tensor code (collectives.py's exchanges) is traced once per
signature with make_fx and its ops are copied in; see `trace_fragment` for what a fragment may do.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Union

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.interp import sympy_interp

from paracompile.meta import mark_fragment

aten = torch.ops.aten
GraphSize = Union[int, fx.Node]


class GraphBuilder:
    def __init__(self, graph: fx.Graph, symbol_values: dict[sympy.Symbol, fx.Node]):
        self.graph = graph
        self.symbol_values = symbol_values
        # Symbols known only as a size of some input tensor: (input node, dim), read on first use.
        self.symbol_sources: dict[sympy.Symbol, tuple[fx.Node, int]] = {}

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def size(self, value: Any) -> GraphSize:
        """A global size (int or SymInt from the original graph's metadata) as a value of the new graph."""
        if isinstance(value, int):
            return value
        if isinstance(value, torch.SymInt):
            constant = value.node.maybe_as_int()
            if constant is not None:
                return constant
            return self._expression(value.node.expr)
        raise TypeError(f"expected an int or SymInt size, got {value!r}")

    def _expression(self, expr: sympy.Expr) -> GraphSize:
        try:
            return sympy_interp(_SizeArithmetic(self), self.symbol_values, expr, missing_handler=self._symbol)
        except (KeyError, AttributeError):  # a sympy function torch's table or this builder has no handler for
            raise NotImplementedError(
                f"paracompile: cannot rebuild the symbolic size {expr} ({type(expr).__name__}) in the rewritten "
                "graph") from None

    def _symbol(self, symbol: sympy.Symbol) -> fx.Node:
        """A symbol that is no SymInt input: read from the input tensor whose size it is, once."""
        if symbol not in self.symbol_sources:
            raise NotImplementedError(
                f"paracompile: the symbolic size {symbol} is not an input of the graph, so the rewritten "
                "graph cannot compute it")
        tensor, dim = self.symbol_sources[symbol]
        self.symbol_values[symbol] = self.call(aten.sym_size.int, tensor, dim)
        return self.symbol_values[symbol]

    # Integer arithmetic on ints (folded) and graph nodes (emitted).
    def _binary(self, op, a: GraphSize, b: GraphSize) -> GraphSize:
        if isinstance(a, int) and isinstance(b, int):
            return op(a, b)
        return self.call(op, a, b)

    def add(self, a: GraphSize, b: GraphSize) -> GraphSize:
        if isinstance(b, int) and b == 0:
            return a
        if isinstance(a, int) and a == 0:
            return b
        return self._binary(operator.add, a, b)

    def sub(self, a: GraphSize, b: GraphSize) -> GraphSize:
        if isinstance(b, int) and b == 0:
            return a
        return self._binary(operator.sub, a, b)

    def mul(self, a: GraphSize, b: GraphSize) -> GraphSize:
        if isinstance(b, int) and b == 1:
            return a
        if isinstance(a, int) and a == 1:
            return b
        if (isinstance(a, int) and a == 0) or (isinstance(b, int) and b == 0):
            return 0
        return self._binary(operator.mul, a, b)

    def floordiv(self, a: GraphSize, b: GraphSize) -> GraphSize:
        if isinstance(b, int) and b == 1:
            return a
        return self._binary(operator.floordiv, a, b)

    def ceildiv(self, a: GraphSize, b: int) -> GraphSize:
        return self.floordiv(self.add(a, b - 1), b)

    def minimum(self, *values: GraphSize) -> GraphSize:
        return self._fold(torch.sym_min, min, values)

    def maximum(self, *values: GraphSize) -> GraphSize:
        return self._fold(torch.sym_max, max, values)

    def _fold(self, symbolic, python, values) -> GraphSize:
        result = values[0]
        for value in values[1:]:
            if isinstance(result, int) and isinstance(value, int):
                result = python(result, value)
            else:
                result = self.call(symbolic, result, value)
        return result

    def total(self, values: list[GraphSize]) -> GraphSize:
        result: GraphSize = 0
        for value in values:
            result = self.add(result, value)
        return result

    # Tensor helpers used by several passes.
    def narrow(self, tensor: fx.Node, dim: int, start: GraphSize, length: GraphSize) -> fx.Node:
        return self.call(aten.slice.Tensor, tensor, dim, start, self.add(start, length))

    def cat(self, tensors: list[fx.Node], dim: int) -> fx.Node:
        if len(tensors) == 1:
            return tensors[0]
        return self.call(aten.cat.default, tensors, dim)

    def pad_end(self, tensor: fx.Node, dim: int, ndim: int, amount: GraphSize) -> fx.Node:
        """Zero-pads `tensor` at the end of `dim` by `amount` elements."""
        if isinstance(amount, int) and amount == 0:
            return tensor
        pad = [0, 0] * (ndim - 1 - dim) + [0, amount]
        return self.call(aten.constant_pad_nd.default, tensor, pad, 0.0)

    # Traced fragments.
    def insert_traced(self, fragment: Callable, inputs: list[fx.Node], ndims: list[int], **constants: Any):
        """The ops `fragment(*inputs, **constants)` calls, appended to the graph (trace_fragment); returns
        what it returns, as nodes of this graph. `ndims`: each input's number of dims."""
        traced = trace_fragment(fragment, tuple(ndims), tuple(sorted(constants.items())))
        env = dict(zip([node for node in traced.nodes if node.op == "placeholder"], inputs))
        for node in traced.nodes:
            if node.op == "output":
                return fx.map_arg(node.args[0], env.__getitem__)
            if node.op == "call_function":
                args, kwargs = fx.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = mark_fragment(self.call(node.target, *args, **kwargs), fragment.__name__)
            elif node.op != "placeholder":
                raise AssertionError(f"paracompile: fragment {fragment.__name__} traced to a {node.op} node")
        raise AssertionError("a traced graph ends in an output node")


class _SizeArithmetic:
    """sympy_interp's handlers for the integer functions sizes use, emitting through the builder's folding
    arithmetic, so a static part of an expression stays a constant. (No CeilDiv: torch builds one as a
    FloorDiv or a CleanDiv.)"""

    def __init__(self, builder: GraphBuilder):
        self.add, self.mul, self.floordiv = builder.add, builder.mul, builder.floordiv
        self.minimum, self.maximum = builder.minimum, builder.maximum
        self.mod = self.python_mod = functools.partial(builder._binary, operator.mod)

    @staticmethod
    def constant(value, dtype) -> int:
        if dtype is not torch.int64:
            raise NotImplementedError(f"paracompile: a size expression holds the non-integer {value}")
        return int(value)

    def pow_by_natural(self, base: GraphSize, exponent: GraphSize) -> GraphSize:
        if not isinstance(exponent, int) or exponent < 1:
            raise NotImplementedError(f"paracompile: cannot rebuild a size raised to the power {exponent}")
        result = base
        for _ in range(exponent - 1):
            result = self.mul(result, base)
        return result


# A traced fragment's example inputs: every dim its own symbol, with a hint that every group size up to 16
# divides (a fragment may split a dim over the ranks; the meta functions check it on the hints).
_EXAMPLE_HINT = 720720


@functools.lru_cache(maxsize=None)
def trace_fragment(fragment: Callable, ndims: tuple[int, ...], constants: tuple) -> fx.Graph:
    """`fragment(*tensors, **dict(constants))` on tensors of these ranks, traced by make_fx: pre-dispatch,
    so the graph holds the ops the fragment calls as it calls them (`contiguous`, `movedim` and `reshape`
    stay themselves instead of becoming what the example's strides would make of them), and symbolic, so
    an input size the fragment passes on becomes a `sym_size` node of whatever the fragment is inserted on.

    What a fragment may do: call tensor ops and functional collectives; its own sizes (dims, splits, group
    sizes) are Python ints among `constants`, so the trace is the same for every graph and is made once per
    signature. What it must not do: branch on its inputs' sizes (the trace would keep the branch the example
    took). Sizes that are symbolic in the rewritten graph are the builder's (`size` and its arithmetic):
    make_fx would need example values of them that agree with the tensors', which the rewrite does not have.

    Traced in a fake mode and ShapeEnv of its own, outside Dynamo's tracing context: the trace's guards
    (the meta functions' checks on example sizes) must not reach the guards of the graph being compiled."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv(duck_shape=False)  # a symbol per dim: sym_size of the right dim, never a look-alike
    mode = FakeTensorMode(shape_env=shape_env)
    mode.cache_enabled = False  # its cache entries cost more than tracing a fragment (traced once)

    def example(position: int, ndim: int) -> torch.Tensor:
        sizes = [shape_env.create_symintnode(shape_env.create_symbol(
            _EXAMPLE_HINT, ConstantSource(f"input{position}_dim{dim}"), dynamic_dim=DimDynamic.DYNAMIC),
            hint=_EXAMPLE_HINT) for dim in range(ndim)]
        with mode:
            return torch.empty(sizes, device="meta")

    examples = [example(position, ndim) for position, ndim in enumerate(ndims)]
    with torch._guards.tracing(None):
        traced = make_fx(functools.partial(fragment, **dict(constants)), tracing_mode="symbolic",
                         pre_dispatch=True)(*examples)
    return traced.graph
