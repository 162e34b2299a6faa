"""paracompile/graph_builder.py: symbolic sizes rebuilt from the graph's own inputs (torch's sympy_interp),
and fragments traced with make_fx and copied into a graph (collectives.py's exchanges)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from paracompile import collectives, meta
from paracompile.graph_builder import GraphBuilder, trace_fragment

aten = torch.ops.aten
functional = torch.ops._c10d_functional


def _symbols(*hints):
    shape_env = ShapeEnv()
    return [shape_env.create_symintnode(shape_env.create_symbol(hint, ConstantSource(f"size{i}")), hint=hint)
            for i, hint in enumerate(hints)]


@pytest.mark.parametrize("values", [(10, 3), (7, 12), (33, 5)])
def test_a_symbolic_size_is_computed_from_the_graph_inputs(values):
    """Every function sizes use (sum, product, power, floor and ceil division, modulo, min, max), for input
    values other than the hints the expression was made with; one symbol is read from a tensor's size."""
    a, b = _symbols(10, 3)
    expressions = [a + 2 * b, (a + 3) // 4 * b, -(-a // 3), a % 3, a ** 2 + b, torch.sym_max(a, b) - torch.sym_min(a, 2 * b),
                   torch.sym_max(0, torch.sym_min((a + 1) // 2, a - (a + 1) // 2 * 1))]
    graph = fx.Graph()
    builder = GraphBuilder(graph, {a.node.expr: graph.placeholder("a")})
    builder.symbol_sources[b.node.expr] = (graph.placeholder("tensor"), 1)  # b is only a tensor's size
    graph.output([builder.size(expression) for expression in expressions])
    module = fx.GraphModule(torch.nn.Module(), graph)
    x, y = values
    assert module(x, torch.empty(2, y)) == [x + 2 * y, (x + 3) // 4 * y, -(-x // 3), x % 3, x ** 2 + y,
                                            max(x, y) - min(x, 2 * y), max(0, min((x + 1) // 2, x - (x + 1) // 2))]
    assert sum(node.target is aten.sym_size.int for node in graph.nodes) == 1  # read once, reused


def test_a_static_size_stays_a_constant():
    graph = fx.Graph()
    builder = GraphBuilder(graph, {})
    assert builder.size(7) == 7 and builder.ceildiv(35, 2) == 18 and builder.add(builder.mul(3, 4), 0) == 12
    assert not list(graph.nodes)


def test_a_symbol_the_graph_cannot_compute_is_an_error():
    (a,) = _symbols(5)
    with pytest.raises(NotImplementedError, match="is not an input of the graph"):
        GraphBuilder(fx.Graph(), {}).size(a + 1)


def _inserted(fragment, ndims, **constants):
    graph = fx.Graph()
    inputs = [graph.placeholder(f"input{i}") for i in range(len(ndims))]
    output = GraphBuilder(graph, {}).insert_traced(fragment, inputs, ndims, **constants)
    graph.output(output)
    return graph


def test_an_inserted_fragment_is_the_ops_it_calls_with_only_its_name_as_meta():
    graph = _inserted(collectives._gather_leading, [3], dim=1, ranks=2, group_name="unused", differentiable=False)
    calls = [node for node in graph.nodes if node.op == "call_function"]
    assert [node.target for node in calls] == [aten.movedim.int, aten.contiguous.default,
                                               functional.all_gather_into_tensor.default, functional.wait_tensor.default]
    assert calls[2].args[1:] == (2, "unused")
    assert all(node.meta == {meta.FRAGMENT: "_gather_leading"} for node in calls)


def test_a_fragment_keeps_its_contiguous_whatever_the_example_strides():
    """Tensor.contiguous() of a contiguous tensor returns it undispatched, so a trace would drop the copy the
    graph's own (maybe channels-last) tensor needs: the fragments call the op."""
    graph = _inserted(collectives._gather_leading, [3], dim=0, ranks=2, group_name="unused", differentiable=False)
    assert aten.contiguous.default in [node.target for node in graph.nodes]


def _new_zeros_like_dims(tensor):
    return tensor.new_zeros([tensor.shape[2], tensor.shape[0] * 2])


def test_a_fragment_that_reads_a_size_reads_it_at_run_time_from_its_dim():
    """Traced symbolically, with a symbol per dim: what the fragment reads of its inputs' sizes is read again
    at every call, from the dim it named, whatever the sizes the trace saw."""
    module = fx.GraphModule(torch.nn.Module(), _inserted(_new_zeros_like_dims, [3]))
    assert module(torch.ones(3, 4, 5)).shape == (5, 6)
    assert module(torch.ones(7, 1, 2)).shape == (2, 14)


def test_a_fragment_is_traced_once_per_signature():
    trace_fragment.cache_clear()
    for _ in range(3):
        _inserted(collectives._dense_in_order, [3], order=(2, 0, 1))
    _inserted(collectives._dense_in_order, [3], order=(1, 0, 2))
    assert trace_fragment.cache_info().misses == 2 and trace_fragment.cache_info().hits == 2


@pytest.mark.parametrize("order", [(2, 0, 1), (1, 0, 2), (0, 1, 2)])
def test_dense_in_order_keeps_values_and_lays_dims_out_in_that_order(order):
    module = fx.GraphModule(torch.nn.Module(), _inserted(collectives._dense_in_order, [3], order=order))
    tensor = torch.randn(4, 5, 6)
    result = module(tensor)
    assert torch.equal(result, tensor)
    assert collectives.physical_order(result.shape, result.stride()) == list(order)
