"""Tracing Dynamo's graph down to aten ops.

Invariant: the returned graph computes what Dynamo's graph computes, takes the same flat inputs (a
tensor subclass's inner tensors in its place, see below), and is made of aten ops above autograd
(pre-dispatch), so attention is still one `aten.scaled_dot_product_attention` node and the op set is
small and canonical. Every node carries `meta["val"]` (a FakeTensor, SymInt or SymFloat with global,
possibly symbolic, values) and the `nn_module_stack` of the Dynamo node it came from.

Scalars that change from call to call stay inputs. Dynamo lifts a Python float argument (a timestep,
a guidance scale, a sigma) into a 0-d tensor input and reads it with `.item()`; its fake example value
remembers the SymFloat that read gives (`item_memo`). make_fx hands the traced function fresh fake
tensors without that memo, so the trace puts it back on them: the read then becomes an
`aten.item` node whose value is the symbol, every later use reads that node, and the compiled graph
takes the new value on every call instead of the one it was traced with.

A tensor-subclass input (a torchao quantized weight) becomes its inner tensors, one placeholder each
(passes/subclass_inputs.py): the traced function rebuilds the subclass around them, so the graph holds
the subclass's implementation as aten ops on plain tensors, and the caller flattens the subclass
arguments of each call the same way (`flatten_subclasses`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from paracompile.passes.fake_propagation import propagate_fake_values, remember_scalar_reads
from paracompile.meta import EXAMPLE_VALUE
from paracompile.passes.out_of_place import writes_out_of_place
from paracompile.passes.subclass_inputs import Unflatten, flatten_subclasses, has_subclasses


def trace_to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    fake_inputs = [node.meta[EXAMPLE_VALUE] for node in placeholders]
    flat_inputs, names = flatten_subclasses(fake_inputs, [node.target for node in placeholders])
    unflatten = Unflatten(fake_inputs)
    scalar_reads = [getattr(value, "item_memo", None) if isinstance(value, torch.Tensor) else None
                    for value in fake_inputs]

    def run(*flat):
        inputs = unflatten(flat)
        for tensor, read in zip(inputs, scalar_reads):
            if read is not None:
                tensor.item_memo = read
        return torch.fx.Interpreter(gm).run(*inputs)

    with fx_traceback.preserve_node_meta():
        decompositions = custom_op_decompositions() if has_subclasses(fake_inputs) or _calls_custom_ops(gm) else {}
        traced = make_fx(run, pre_dispatch=True, tracing_mode="symbolic",
                         decomposition_table=decompositions)(*flat_inputs)
    for node, name in zip((n for n in traced.graph.nodes if n.op == "placeholder"), names):
        node.target = name
    writes_out_of_place(traced.graph)  # `y += bias` on a temporary: no write the token pass must follow
    traced.recompile()
    remember_scalar_reads(traced)  # on the fake values the graph's placeholders keep, for later propagations
    traced.graph.lint()
    return traced


def _calls_custom_ops(gm: fx.GraphModule) -> bool:
    """Whether Dynamo's graph calls an op outside aten and prims itself (a quantized weight's ops run inside
    its subclass, and show only once it is traced as its inner tensors)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and _op_namespace(node.target) not in (None, "aten", "prims"):
            return True
    return False


def _op_namespace(target) -> "str | None":
    """An op's namespace; Dynamo's graphs call packets (`torch.ops.ns.op`) and, where it captured an aten
    call directly (data-dependent ops under `capture_dynamic_output_shape_ops`), overloads: only packets
    have `_qualified_op_name`."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return None


def custom_op_decompositions() -> dict:
    """Ops outside aten and prims that autograd would decompose (a CompositeImplicitAutograd kernel) and
    Inductor decomposes anyway (its decomposition table): torchao's `choose_qparams_affine` and
    `quantize_affine`, say, which a pre-dispatch trace keeps whole for torch.export's sake. Decomposed here,
    they reach the sharding rules as aten ops (a per-token scale is an amax over a dim other than the token
    axis) rather than as unknown ops that would run replicated on gathered inputs."""
    from torch._inductor.decomposition import decompositions

    return {op: function for op, function in decompositions.items()
            if isinstance(op, torch._ops.OpOverload) and op.namespace not in ("aten", "prims")
            and torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")}


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
