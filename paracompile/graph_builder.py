"""Emitting nodes into the rewritten graph.

Sizes come from the original graph's metadata as ints or SymInts. In the rewritten graph an int stays a
constant and a SymInt becomes nodes computed from the graph's own symbolic inputs, so the rewritten graph
stays correct for every shape its guards admit. The arithmetic helpers fold constants, so graphs with
static shapes keep static sizes, which Inductor prefers.
"""
from __future__ import annotations

import operator
from typing import Any, Union

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import CeilDiv, CleanDiv, FloorDiv, Max, Min, Mod, PowByNatural, PythonMod

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
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            if expr not in self.symbol_values and expr in self.symbol_sources:
                tensor, dim = self.symbol_sources[expr]
                self.symbol_values[expr] = self.call(aten.sym_size.int, tensor, dim)
            if expr not in self.symbol_values:
                raise NotImplementedError(
                    f"paracompile: the symbolic size {expr} is not an input of the graph, so the rewritten "
                    "graph cannot compute it"
                )
            return self.symbol_values[expr]
        parts = [self._expression(arg) for arg in expr.args]
        if isinstance(expr, sympy.Add):
            result = parts[0]
            for part in parts[1:]:
                result = self.add(result, part)
            return result
        if isinstance(expr, sympy.Mul):
            result = parts[0]
            for part in parts[1:]:
                result = self.mul(result, part)
            return result
        if isinstance(expr, (sympy.Pow, PowByNatural)) and expr.args[1].is_Integer and int(expr.args[1]) >= 1:
            result = parts[0]
            for _ in range(int(expr.args[1]) - 1):
                result = self.mul(result, parts[0])
            return result
        if isinstance(expr, FloorDiv):
            return self.floordiv(parts[0], parts[1])
        if isinstance(expr, CleanDiv):
            return self.floordiv(parts[0], parts[1])
        if isinstance(expr, CeilDiv):
            return self.ceildiv(parts[0], parts[1])
        if isinstance(expr, (Mod, PythonMod)):
            return self._binary(operator.mod, parts[0], parts[1])
        if isinstance(expr, Min):
            return self.minimum(*parts)
        if isinstance(expr, Max):
            return self.maximum(*parts)
        raise NotImplementedError(
            f"paracompile: cannot rebuild the symbolic size {expr} ({type(expr).__name__}) in the rewritten graph"
        )

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
