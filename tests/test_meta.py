"""paracompile/meta.py: a node that stands for an original takes its origin's meta, and only that."""
from __future__ import annotations

import torch
import torch.fx as fx

from paracompile import meta


def _node(graph: fx.Graph, name: str) -> fx.Node:
    return graph.call_function(torch.ops.aten.relu.default, (graph.placeholder(name),))


def test_copy_origin_copies_the_module_stack_and_source_and_nothing_else():
    graph = fx.Graph()
    original, new = _node(graph, "x"), _node(graph, "y")
    original.meta.update({meta.NN_MODULE_STACK: {"blocks_0": ("blocks.0", "Block")}, meta.STACK_TRACE: "model.py:3",
                          meta.SOURCE_FN_STACK: [("relu", "relu")], meta.VAL: "the global value",
                          meta.ATTENTION_KIND: "ring"})
    assert meta.copy_origin(new, original) is new
    assert new.meta == {meta.NN_MODULE_STACK: {"blocks_0": ("blocks.0", "Block")}, meta.STACK_TRACE: "model.py:3",
                        meta.SOURCE_FN_STACK: [("relu", "relu")]}


def test_mark_attention_records_the_strategy_for_the_backend():
    graph = fx.Graph()
    original, output = _node(graph, "x"), _node(graph, "y")
    original.meta[meta.NN_MODULE_STACK] = {"attn": ("blocks.0.attn", "Attention")}
    meta.mark_attention(output, original, "ulysses")
    assert meta.attention_kind(output) == "ulysses" and meta.attention_kind(original) is None
    assert output.meta[meta.NN_MODULE_STACK] == original.meta[meta.NN_MODULE_STACK]
