"""Fake-tensor propagation over a rewritten graph: every node's `meta["val"]` recomputed for this rank.

Invariant: after `propagate_fake_values(gm)`, every node of `gm` carries the fake value (FakeTensor,
SymInt, SymFloat) that running it on the placeholders' fake values gives, in the fake mode and ShapeEnv
those values belong to. Nodes the sharding passes created have none until then.

Scalar reads of inputs (an `aten.item` of a Python float Dynamo lifted into a 0-d tensor,
trace_to_aten.py) give back the same symbol as in the trace: the placeholder's fake value remembers it
(`item_memo`), but FakeTensorProp starts a new epoch of the fake mode, which forgets every such memo, so
they are put back from the graph's own `item` nodes before propagating.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

aten = torch.ops.aten
SCALAR_READS = (aten.item.default, aten._local_scalar_dense.default)


def remember_scalar_reads(gm: fx.GraphModule) -> None:
    """Sets each read placeholder's `item_memo` to the symbol its `item` node holds."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SCALAR_READS and node.args[0].op == "placeholder":
            symbol = node.meta.get("val")
            if isinstance(symbol, (torch.SymFloat, torch.SymInt, torch.SymBool)):
                node.args[0].meta["val"].item_memo = symbol


def propagate_fake_values(gm: fx.GraphModule, keep_guards: bool = True) -> None:
    """`keep_guards=False` adds no guards to the ShapeEnv (a graph that runs as it is, rather than one a
    compiler specialises from these values)."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    values = [node.meta["val"] for node in gm.graph.nodes if node.op == "placeholder"]
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    propagation = FakeTensorProp(gm, fake_mode)  # starts a new epoch: memos are set after this
    remember_scalar_reads(gm)
    shape_env = fake_mode.shape_env
    quiet = shape_env.suppress_guards() if shape_env is not None and not keep_guards else contextlib.nullcontext()
    # The Python dispatcher gives ops with symbolic size arguments (constant_pad_nd by a SymInt, say) their
    # Python meta functions; their C++ ones accept only concrete sizes.
    with enable_python_dispatcher(), quiet:
        propagation.propagate_dont_convert_inputs(*values)
