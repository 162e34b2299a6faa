"""Batch sharding: the `batch` mesh dim (classifier-free-guidance parallelism).

Invariant after the pass: the returned graph, run on every rank of a batch group with the same full
inputs, returns the same full outputs as the original graph; in between, every op that treats batch
rows independently runs on this rank's rows (batch / degree of them), and outputs are all-gathered.

The batch axis is traced like the token axis (shard_tokens.py, with the same rule table): from dim 0 of
every attention's q, k, v (and mask, when it has one row per batch entry) back to where it starts. Then
the token pass runs on the result, over the sequence group of this rank's batch index.
"""
from __future__ import annotations

import torch.fx as fx

from paracompile.collectives import ProcessGroupInfo
from paracompile.explain import Report, describe_node
from paracompile.meta import copy_origin
from paracompile.passes.fake_propagation import propagate_fake_values
from paracompile.passes.sharding_rules import OpView
from paracompile.passes.shard_tokens import shard_tokens
from paracompile.passes.sharding_plan import AttentionSite, attention_nodes, find_axis_sources
from paracompile.passes.token_layout import known_divisible, same_size


class BatchSizeError(ValueError):
    pass


def shard_batch(gm: fx.GraphModule, group: ProcessGroupInfo, report: Report) -> fx.GraphModule:
    seeds = []
    for node in attention_nodes(gm.graph):
        view = OpView(node, lambda _: None)
        batch = view.shape(view["query"])[0]
        if len(view.shape(view["query"])) < 3 or not known_divisible(batch, group.size):
            raise BatchSizeError(
                f"paracompile: {describe_node(node)} has batch size {batch}, which the batch mesh degree "
                f"{group.size} does not divide; use a batch that the degree divides (e.g. cond and uncond "
                "together), or a mesh without 'batch'")
        seeds += [(view[name], 0) for name in ("query", "key", "value")]
        mask = view["attn_mask"]
        if isinstance(mask, fx.Node) and len(view.shape(mask)) >= 3 and not same_size(view.shape(mask)[0], 1):
            seeds.append((mask, 0))
    sharded = shard_tokens(gm, group, report, BatchAttention(), demands=find_axis_sources(seeds))
    sharded.graph.eliminate_dead_code()
    sharded.graph.lint()
    sharded.recompile()
    propagate_fake_values(sharded)  # the token pass reads shapes from node.meta["val"]
    return sharded


class BatchAttention:
    """Attention treats batch rows independently: on batch shards it runs as it is."""

    def plan(self, node: fx.Node, layout_of) -> AttentionSite:
        view = OpView(node, layout_of)
        layout = view.layout("query")
        if layout is None or layout.dim != 0:
            return AttentionSite("replicated", "the batch axis does not reach its queries")
        inputs = {name: layout for name in ("query", "key", "value")}
        mask = view["attn_mask"]
        if isinstance(mask, fx.Node) and len(view.shape(mask)) >= 3 and not same_size(view.shape(mask)[0], 1):
            inputs["attn_mask"] = layout
        return AttentionSite("batch", inputs=inputs, output=layout)

    def __call__(self, rewriter, node: fx.Node) -> None:
        site = self.plan(node, rewriter.layout_of)
        view = OpView(node, rewriter.layout_of)
        name = describe_node(node)
        args = dict(view.args)
        if site.kind == "replicated":
            for tensor_name in ("query", "key", "value", "attn_mask"):
                if isinstance(args[tensor_name], fx.Node):
                    args[tensor_name] = rewriter.replicated(args[tensor_name], f"{name}: queries are not batch-split")
            rewriter.bind_replicated(node, rewriter.emit(node.target, args))
            rewriter.report.attention.append(f"{name}: replicated ({site.reason})")
            return
        for tensor_name in ("query", "key", "value", "attn_mask"):
            if not isinstance(args[tensor_name], fx.Node):
                continue
            layout = site.inputs.get(tensor_name)
            args[tensor_name] = (rewriter.sharded(view[tensor_name], layout, name) if layout is not None
                                 else rewriter.replicated(view[tensor_name], name))
        new = rewriter.emit(node.target, args)
        copy_origin(new, node)
        rewriter.bind_sharded(node, new, site.output)
        rewriter.report.attention.append(f"{name}: batch rows split over {rewriter.group.size} ranks")
