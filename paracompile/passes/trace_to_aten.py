"""Tracing Dynamo's graph down to aten ops.

Invariant: the returned graph computes what Dynamo's graph computes, takes the same flat inputs, and is
made of aten ops above autograd (pre-dispatch), so attention is still one
`aten.scaled_dot_product_attention` node and the op set is small and canonical. Every node carries
`meta["val"]` (a FakeTensor, SymInt or SymFloat with global, possibly symbolic, values) and the
`nn_module_stack` of the Dynamo node it came from.

Scalars that change from call to call stay inputs. Dynamo lifts a Python float argument (a timestep,
a guidance scale, a sigma) into a 0-d tensor input and reads it with `.item()`; its fake example value
remembers the SymFloat that read gives (`item_memo`). make_fx hands the traced function fresh fake
tensors without that memo, so the trace puts it back on them: the read then becomes an
`aten.item` node whose value is the symbol, every later use reads that node, and the compiled graph
takes the new value on every call instead of the one it was traced with.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from paracompile.passes.fake_propagation import propagate_fake_values, remember_scalar_reads
from paracompile.meta import EXAMPLE_VALUE


def trace_to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    fake_inputs = [node.meta[EXAMPLE_VALUE] for node in placeholders]
    scalar_reads = [getattr(value, "item_memo", None) if isinstance(value, torch.Tensor) else None
                    for value in fake_inputs]

    def run(*inputs):
        for tensor, read in zip(inputs, scalar_reads):
            if read is not None:
                tensor.item_memo = read
        return torch.fx.Interpreter(gm).run(*inputs)

    with fx_traceback.preserve_node_meta():
        traced = make_fx(run, pre_dispatch=True, tracing_mode="symbolic")(*fake_inputs)
    for node, original in zip((n for n in traced.graph.nodes if n.op == "placeholder"), placeholders):
        node.target = original.target
    remember_scalar_reads(traced)  # on the fake values the graph's placeholders keep, for later propagations
    traced.graph.lint()
    return traced


def is_aten_graph(gm: fx.GraphModule) -> bool:
    """Dynamo's graph describes its inputs with `example_value`; traced aten graphs with `val`."""
    return all("val" in node.meta for node in gm.graph.nodes if node.op == "placeholder")


def aten_graph_with_values(gm: fx.GraphModule, example_inputs: list, keep_guards: bool) -> fx.GraphModule:
    """`gm` as an aten graph whose every node carries `meta["val"]`: Dynamo's graph is traced first; a
    rewritten graph gets the values of the nodes the passes created (see propagate_fake_values for
    `keep_guards`)."""
    if not is_aten_graph(gm):
        gm = trace_to_aten(gm, example_inputs)
    if not all("val" in node.meta for node in gm.graph.nodes if node.op != "output"):
        propagate_fake_values(gm, keep_guards=keep_guards)
    return gm
