"""Tracing Dynamo's graph down to aten ops.

Invariant: the returned graph computes what Dynamo's graph computes, takes the same flat inputs, and is
made of aten ops above autograd (pre-dispatch), so attention is still one
`aten.scaled_dot_product_attention` node and the op set is small and canonical. Every node carries
`meta["val"]` (a FakeTensor or SymInt with global, possibly symbolic, sizes) and the `nn_module_stack` of
the Dynamo node it came from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx


@dataclass(frozen=True)
class FixedScalarInput:
    """A 0-d tensor input whose value the traced graph has baked in (see `_bake_scalar_reads`)."""

    index: int
    value: float
    name: str


def trace_to_aten(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[FixedScalarInput]]:
    fixed = _bake_scalar_reads(gm, example_inputs)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    fake_inputs = [node.meta["example_value"] for node in placeholders]
    with fx_traceback.preserve_node_meta():
        traced = make_fx(torch.fx.Interpreter(gm).run, pre_dispatch=True, tracing_mode="symbolic")(*fake_inputs)
    for node, original in zip((n for n in traced.graph.nodes if n.op == "placeholder"), placeholders):
        node.target = original.target
    return traced, fixed


def _bake_scalar_reads(gm: fx.GraphModule, example_inputs: list) -> list[FixedScalarInput]:
    """With dynamic shapes Dynamo passes Python floats (a LayerNorm's eps, say) as 0-d tensor inputs and
    reads them with `.item()`, which a second trace cannot reproduce (it would be data-dependent). Such
    reads become constants, and `check_fixed_scalars` verifies on every call that the inputs still hold
    those values, so a changed value raises instead of computing with a stale one."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    fixed = []
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "item" and node.args[0].op == "placeholder":
            placeholder = node.args[0]
            index = placeholders.index(placeholder)
            example = example_inputs[index]
            if not isinstance(example, torch.Tensor) or example.numel() != 1:
                continue
            value = example.item()
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            fixed.append(FixedScalarInput(index, value, placeholder.target))
    if fixed:
        gm.recompile()
    return fixed


def check_fixed_scalars(compiled, fixed: list[FixedScalarInput]):
    if not fixed:
        return compiled

    def checked(*args):
        for scalar in fixed:
            if args[scalar.index].item() != scalar.value:
                raise RuntimeError(
                    f"paracompile: the graph was compiled with input {scalar.name} = {scalar.value}, and it is now "
                    f"{args[scalar.index].item()}; call torch._dynamo.reset() to compile again"
                )
        return compiled(*args)

    return checked
