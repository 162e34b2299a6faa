"""Every node-meta key paracompile reads or writes, and the one place where a rewritten node inherits its
origin's meta.

Invariant: a node a pass emits in place of an original node (the op itself on shards, a replicated
fallback, a rewritten attention's output) carries the original's ORIGIN_KEYS, so later passes and reports
see which module it belongs to (First Block Cache finds the block loop by `nn_module_stack`) and errors
point at the model's source line. Nodes emitted around it (slices, pads, collectives) carry none: they
belong to no module of the model. Nodes copied in from a traced fragment (graph_builder.insert_traced)
carry only the name of their fragment: the trace's own meta (fake values of its private ShapeEnv, stack
traces into paracompile) would describe another graph.
"""
from __future__ import annotations

import torch.fx as fx

# Set by torch: the fake tensor (or SymInt) a node computes, at global (original graph) or local shapes.
VAL = "val"
# Set by Dynamo on its own graph's nodes: the example value before tracing to aten.
EXAMPLE_VALUE = "example_value"
# Set by Dynamo, kept through make_fx by trace_to_aten: the module path a node was called from.
NN_MODULE_STACK = "nn_module_stack"
STACK_TRACE = "stack_trace"
SOURCE_FN_STACK = "source_fn_stack"
ORIGIN_KEYS = (NN_MODULE_STACK, STACK_TRACE, SOURCE_FN_STACK)

# Set by the attention strategies on a rewritten attention's output: "ulysses", "ulysses_chunked" or "ring".
# backend.overlap_patches reads it to pick Inductor's reordering passes.
ATTENTION_KIND = "paracompile_attention"
# Set by graph_builder.insert_traced on every node it copies in: the fragment (a function of collectives.py)
# that traced it. Read by nothing in the pipeline; it says where a node of a rewritten graph came from.
FRAGMENT = "paracompile_fragment"


def copy_origin(new: fx.Node, original: fx.Node) -> fx.Node:
    """`new` stands for `original` in a rewritten graph: it takes the original's ORIGIN_KEYS."""
    new.meta.update({key: value for key, value in original.meta.items() if key in ORIGIN_KEYS})
    return new


def mark_attention(output: fx.Node, original: fx.Node, kind: str) -> fx.Node:
    """A rewritten attention's output: its origin's meta, and which strategy produced it."""
    copy_origin(output, original)
    output.meta[ATTENTION_KIND] = kind
    return output


def attention_kind(node: fx.Node):
    return node.meta.get(ATTENTION_KIND)


def mark_fragment(new: fx.Node, fragment: str) -> fx.Node:
    """`new` was copied in from the traced fragment named `fragment`: that name, and no origin."""
    new.meta[FRAGMENT] = fragment
    return new
