"""Tracing Dynamo's graph down to aten ops.

Invariant: the returned graph computes what Dynamo's graph computes, takes the same flat inputs, and is
made of aten ops above autograd (pre-dispatch), so attention is still one
`aten.scaled_dot_product_attention` node and the op set is small and canonical. Every node carries
`meta["val"]` (a FakeTensor or SymInt with global, possibly symbolic, sizes) and the `nn_module_stack` of
the Dynamo node it came from.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx


def trace_to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    fake_inputs = [node.meta["example_value"] for node in placeholders]
    with fx_traceback.preserve_node_meta():
        traced = make_fx(torch.fx.Interpreter(gm).run, pre_dispatch=True, tracing_mode="symbolic")(*fake_inputs)
    for node, original in zip((n for n in traced.graph.nodes if n.op == "placeholder"), placeholders):
        node.target = original.target if isinstance(original.target, str) else node.target
    return traced
