"""Token-axis sharding: the pass that makes a graph run on token shards.

Invariant after the pass: the returned graph, run on every rank of the sequence-parallel group with the
same full inputs, returns the same full outputs as the original graph. In between, every op that acts
on tokens independently runs on this rank's token shard; the only communication is inside attention
(see ulysses_attention.py) and where a value leaves the token-local region (an all-gather). Sizes held
by SymInt nodes keep their global meaning; ops whose arguments spell out token counts get local ones.

Plan, then apply:
1. The plan (sharding_plan.py, before anything is emitted): from the q, k and v of every self-attention,
   walk back through the ops that have a rule to find the dim that holds the token axis in every
   producer; nodes reached this way whose own inputs do not carry the axis (graph inputs, `arange`, the
   flatten after a patch embedding) are where shards are first cut, each with the segments its users
   need. The plan also gives every node its layout and every attention its strategy.
2. The rewrite (this module, once, forward in graph order): every node runs on shards as the plan says,
   with its inputs converted as needed: a replicated input is sliced (free), a sharded input that an op
   needs whole is gathered (reported), a shard with another segment split is re-cut.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from paracompile import collectives
from paracompile.collectives import ProcessGroupInfo, SegmentArithmetic
from paracompile.explain import Report, describe_node, shape_text
from paracompile.graph_builder import GraphBuilder
from paracompile.meta import copy_origin
from paracompile.passes.sharding_plan import (ATTENTION, SHARDED, WRITE_FULL, Aliases, ShardingPlan,
                                              better_source_segments, decide, is_tensor_list, plan_sharding,
                                              tensor_inputs, written_arguments)
from paracompile.passes.sharding_rules import ANY, OpView, Sharding, is_size_query, is_tensor_node, why_not_local
from paracompile.passes.token_layout import TokenLayout, same_size

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------------
# 2. Rewrite

@dataclass
class Value:
    """What the new graph holds for one tensor of the old graph: its full value, its shard, or both."""

    ndim: int
    replicated: Optional[fx.Node] = None
    sharded: Optional[fx.Node] = None
    layout: Optional[TokenLayout] = None
    resliced: dict = field(default_factory=dict)

    native_sharded: bool = False  # which representation the op itself produced; the other is derived

    @property
    def native(self) -> str:
        return "sharded" if self.native_sharded else "replicated"

    def forget_copies(self) -> None:
        """After an in-place write: representations derived before it are stale."""
        self.resliced = {}
        if self.native == "sharded":
            self.replicated = None
        else:
            self.sharded, self.layout = None, None


class LocalShard:
    """Answers a rule's patch about this rank's shard of one layout (sizes as values of the new graph)."""

    def __init__(self, builder: GraphBuilder, layout: TokenLayout, group: ProcessGroupInfo):
        self.builder = builder
        self.sizes = SegmentArithmetic(builder, layout, group)

    @property
    def length(self):
        return self.sizes.local_length()

    def segment_lengths(self):
        return self.sizes.local_lengths()

    def segment_offsets(self):
        return self.sizes.local_offsets()

    def segment_ends(self):
        return [self.builder.add(o, n) for o, n in zip(self.sizes.local_offsets(), self.sizes.local_lengths())]

    def share_of(self, length):
        """How many tokens of a new segment of `length` (global) tokens this rank holds."""
        return SegmentArithmetic(self.builder, TokenLayout(self.sizes.layout.dim, (length,)), self.sizes.group).local_length()


class TokenShardingRewriter:
    def __init__(self, gm: fx.GraphModule, group: ProcessGroupInfo, report: Report, attention_strategy,
                 mesh, plan: ShardingPlan):
        self.gm = gm
        self.group = group  # the group that splits the axis this pass shards
        self.mesh = mesh  # the whole MeshPlan, for attention strategies that use its other groups
        self.report = report
        self.attention_strategy = attention_strategy
        self.graph = fx.Graph()
        self.builder = GraphBuilder(self.graph, {})
        self.env: dict[fx.Node, Any] = {}
        self.plan = plan
        self.cut_sources: set[fx.Node] = set()
        # Re-splits of a value whose source was cut with another segment split (a gather each): the plan
        # settles these, so after a rewrite that followed its plan there are none a better cut would avoid.
        self.resplits: list[tuple[fx.Node, TokenLayout]] = []
        self.aliases = Aliases()
        self.position = {node: index for index, node in enumerate(gm.graph.nodes)}

    # Conversions between representations -------------------------------------------------------
    def replicated(self, node: fx.Node, reason: str) -> fx.Node:
        value = self.env[node]
        if not isinstance(value, Value):
            return value
        if value.replicated is None and value.sharded is None:
            raise AssertionError(f"paracompile: {node.name} was left stale by an in-place write and is read again")
        if value.replicated is None:
            gathered = collectives.gather(self.builder, value.sharded, value.ndim, value.layout, self.group)
            value.replicated = collectives.with_layout_of(self.builder, gathered, value.layout.dim, node.meta["val"])
            self.report.gathers.append(f"{node.name}: {reason}")
        return value.replicated

    def sharded(self, node: fx.Node, layout: TokenLayout, reason: str) -> fx.Node:
        value = self.env[node]
        if value.layout is not None and value.layout == layout:
            return value.sharded
        key = layout.key()
        if key not in value.resliced:
            source = value.replicated
            if source is None:
                self.resplits.append((node, layout))
                source = self.replicated(
                    node, f"re-split from {value.layout.describe()} to {layout.describe()} for {reason}")
            value.resliced[key] = collectives.slice_to_layout(self.builder, source, layout, self.group)
        return value.resliced[key]

    def conversion_cost(self, node: fx.Node, layout: TokenLayout) -> int:
        """What `sharded(node, layout)` would cost: 0 when the node has that layout, or when its full value
        is at hand (a slice); 1 when it would have to be gathered first."""
        value = self.env.get(node)
        if not isinstance(value, Value):
            return 0
        if (value.layout is not None and value.layout == layout) or layout.key() in value.resliced:
            return 0
        return 0 if value.replicated is not None else 1

    def missed_cuts(self) -> dict[fx.Node, tuple]:
        """Sources that the rewrite re-split and that a cut with other segments would have spared: empty
        when the plan foresaw every re-split."""
        planned = {node: layout.segments for node, layout in self.plan.cuts.items()}
        better = better_source_segments(self.resplits, self.layout_of, self.cut_sources, planned)
        return {node: segments for node, segments in better.items() if node not in planned}

    def bind_sharded(self, node: fx.Node, new: fx.Node, layout: TokenLayout) -> None:
        self.env[node] = Value(node.meta["val"].dim(), sharded=new, layout=layout, native_sharded=True)

    def bind_replicated(self, node: fx.Node, new: fx.Node) -> None:
        self.env[node] = Value(node.meta["val"].dim(), replicated=new)

    def layout_of(self, node: fx.Node) -> Optional[TokenLayout]:
        value = self.env.get(node)
        return value.layout if isinstance(value, Value) else None

    # Driver -------------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.target)
                new.meta.update(node.meta)
                self._bind(node, new)
            elif node.op == "get_attr":
                self._bind(node, self.graph.get_attr(node.target))
            elif node.op == "output":
                self._output(node)
            elif node.target is ATTENTION:
                self.attention_strategy(self, node)
            else:
                self._call(node)
            self._record_symbols(node)
        self.graph.lint()
        return fx.GraphModule(self.gm, self.graph)

    def _record_symbols(self, node: fx.Node) -> None:
        """Symbolic sizes in the new graph are computed from values the new graph holds: a SymInt input (or
        a SymInt an op returns, `item()`) is its symbol; a symbol that is a size of some tensor (an input's,
        or a data-dependent one's: `nonzero` under Dynamo's capture_dynamic_output_shape_ops) is read with
        sym_size when needed, from the full tensor, or from a shard along another dim."""
        value, bound = node.meta.get("val"), self.env.get(node)
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            if isinstance(bound, fx.Node):
                self.builder.symbol_values.setdefault(value.node.expr, bound)
        elif isinstance(value, torch.Tensor) and isinstance(bound, Value):
            for dim, size in enumerate(value.shape):
                if not (isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol)):
                    continue
                if bound.replicated is not None:
                    self.builder.symbol_sources.setdefault(size.node.expr, (bound.replicated, dim))
                elif bound.sharded is not None and bound.layout.dim != dim:
                    self.builder.symbol_sources.setdefault(size.node.expr, (bound.sharded, dim))

    def _bind(self, node: fx.Node, new: fx.Node) -> None:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            self.env[node] = Value(value.dim(), replicated=new)
            self._cut_if_demanded(node)
        else:
            self.env[node] = new

    def _cut_if_demanded(self, node: fx.Node) -> None:
        """The token axis starts here: keep the full value for other users and cut this rank's shard."""
        value = self.env[node]
        dim = self.plan.demands.get(node)
        if dim is None or value.sharded is not None:
            return
        length = node.meta["val"].shape[dim]
        if same_size(length, 1) or (isinstance(length, int) and length < self.group.size):
            return
        segments = self.plan.segments_of_cut(node, length)
        layout = TokenLayout(dim, segments)
        self._record_symbols(node)  # the cut may need the node's own sizes
        self.cut_sources.add(node)
        value.sharded = collectives.slice_to_layout(self.builder, value.replicated, layout, self.group)
        value.layout = layout
        self.report.slices.append(f"{describe_node(node)} along dim {dim} (segments {[str(s) for s in segments]})")

    def _map_plain(self, value: Any, reason: str) -> Any:
        """Maps an argument to the new graph with every tensor replicated."""
        if isinstance(value, fx.Node):
            return self.replicated(value, reason)
        if isinstance(value, (list, tuple)):
            return type(value)(self._map_plain(v, reason) for v in value)
        return value

    def _output(self, node: fx.Node) -> None:
        outputs = self._map_plain(node.args[0], "graph output")
        self.graph.output(outputs)

    def _call(self, node: fx.Node) -> None:
        if node.target is operator.getitem and isinstance(self.env.get(node.args[0]), list):
            self.env[node] = self.env[node.args[0]][node.args[1]]
            self._track_alias(node)
            return
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor) and not is_tensor_list(result):
            self._call_non_tensor(node)
            return
        kind, sharding = decide(node, self.layout_of, self.conversion_cost, lambda n: self.env[n].native_sharded,
                                self.aliases)
        if kind == WRITE_FULL:
            self._write_into_full_tensor(node)
            return
        if kind == SHARDED and not (sharding.partial in ("max", "min") and self.group.differentiable):
            self._emit_sharded(node, sharding)
            return
        sharded_inputs = any(self.layout_of(n) is not None for n in tensor_inputs(node))
        reason = self._why_not_local(node) if sharded_inputs else ""
        new = self._copy(node, lambda v: self._map_plain(v, reason))
        self._after_write(node)
        self._track_alias(node, new)
        if isinstance(result, torch.Tensor):
            self.env[node] = Value(result.dim(), replicated=new)
            self._cut_if_demanded(node)
        else:
            self.env[node] = [Value(t.dim(), replicated=self.graph.call_function(operator.getitem, (new, i)))
                              for i, t in enumerate(result)]

    def _why_not_local(self, node: fx.Node) -> str:
        reason = why_not_local(node.target)
        if reason is None:
            return f"{describe_node(node)}: no token rule for this op (add one to passes/sharding_rules.py)"
        return f"{describe_node(node)}: {reason}"

    def _call_non_tensor(self, node: fx.Node) -> None:
        """SymInt arithmetic and size queries keep their global meaning."""
        if is_size_query(node.target):
            source = node.args[0]
            if self.layout_of(source) is not None and self.env[source].replicated is None:
                self.env[node] = self.builder.size(node.meta["val"])
                return
        self.env[node] = self._copy(node, lambda v: self._map_plain(v, f"{describe_node(node)} reads values"))

    def _copy(self, node: fx.Node, map_arg) -> fx.Node:
        args = tuple(map_arg(a) for a in node.args)
        kwargs = {k: map_arg(v) for k, v in node.kwargs.items()}
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        return copy_origin(new, node)

    def _emit_sharded(self, node: fx.Node, sharding: Sharding) -> None:
        view = OpView(node, self.layout_of)
        reason = describe_node(node)
        args: dict[str, Any] = {}
        for name, value in view.args.items():
            required = sharding.inputs.get(name)
            if isinstance(value, (list, tuple)) and any(is_tensor_node(v) for v in value):
                required = required if isinstance(required, list) else [None] * len(value)
                args[name] = [self._convert(v, r, reason) for v, r in zip(value, required)]
            elif is_tensor_node(value):
                args[name] = self._convert(value, required, reason)
            else:
                args[name] = self._map_plain(value, reason)
        target = node.target
        if sharding.patch is not None:
            layout = _first_layout(sharding.inputs.values())
            args = sharding.patch(self.builder, args, LocalShard(self.builder, layout, self.group))
            target = args.pop("__target__", target)
        new = self.emit(target, args)
        copy_origin(new, node)
        if sharding.partial is not None:
            new = collectives.all_reduce(self.builder, new, node.meta["val"].dim(), self.group, sharding.partial)
            self.report.reductions.append(f"{describe_node(node)}: reduces over the token axis; each rank's "
                                          f"partial {sharding.partial} all-reduced to {shape_text(node)}")
        self._after_write(node)
        self._track_alias(node, new)
        if sharding.output is None:
            self.bind_replicated(node, new)
            self._cut_if_demanded(node)
        elif isinstance(sharding.output, list):
            self.env[node] = [Value(t.dim(), sharded=self.graph.call_function(operator.getitem, (new, i)),
                                    layout=layout, native_sharded=True)
                              for i, (t, layout) in enumerate(zip(node.meta["val"], sharding.output))]
        else:
            self.env[node] = Value(node.meta["val"].dim(), sharded=new, layout=sharding.output, native_sharded=True)

    def _convert(self, node: fx.Node, required: Optional[TokenLayout], reason: str) -> fx.Node:
        if required is ANY:
            value = self.env[node]
            return value.sharded if value.native_sharded else value.replicated
        if required is None:
            return self.replicated(node, f"{reason} needs it whole")
        return self.sharded(node, required, reason)

    def emit(self, target, args: dict[str, Any]) -> fx.Node:
        """A call of the aten op `target` in the new graph, its arguments given by schema name (OpView.args
        after conversion): the one way rules' patches and attention strategies add the op they rewrite."""
        schema = target._schema
        positional, keywords = [], {}
        for argument in schema.arguments:
            if argument.name not in args:
                continue
            if argument.kwarg_only:
                keywords[argument.name] = args[argument.name]
            else:
                positional.append(args[argument.name])
        return self.graph.call_function(target, tuple(positional), keywords)

    # In-place writes ---------------------------------------------------------------------------
    # An in-place op must write into the storage that later readers of the tensor read: its alias root's
    # own (native) representation, reached through views that were each applied to their input's own
    # representation ("true views"). Anything else (a gathered or re-cut copy somewhere in the view chain)
    # would lose the update, so such a write runs on the full tensor instead: the root's replicated
    # storage (gathered first if the root lives sharded), the view chain replayed on it. Afterwards the
    # root lives replicated, and every alias of it that is not a true view is rebuilt from it.

    def _written_nodes(self, node: fx.Node) -> list[fx.Node]:
        """The tensors `node` writes into."""
        arguments = OpView(node, self.layout_of).args
        return [arguments[name] for name in written_arguments(node) if is_tensor_node(arguments[name])]

    def _native_node(self, node: fx.Node) -> Optional[fx.Node]:
        value = self.env.get(node)
        if not isinstance(value, Value):
            return None
        return value.sharded if value.native_sharded else value.replicated

    def _write_into_full_tensor(self, node: fx.Node) -> None:
        """Runs the in-place op `node` on the full tensor it writes into (see above)."""
        written = self._written_nodes(node)
        root = self.aliases.root_of(written[0])
        if any(self.aliases.root_of(w) is not root for w in written[1:]):
            raise NotImplementedError(f"paracompile: {describe_node(node)} writes into several tensors at once, and "
                                      "they cannot all be kept exact on token shards")
        reason = f"{describe_node(node)} writes in place into it through a view the shards cannot follow"
        root_value = self.env[root]
        storage = self.replicated(root, reason)
        self.env[root] = Value(root_value.ndim, replicated=storage)
        self.aliases.true_views.add(root)
        rebuilt = self._rebuild_aliases(root, reason)
        new = self._copy(node, lambda v: rebuilt.get(v) if isinstance(v, fx.Node) and v in rebuilt
                         else self._map_plain(v, reason))
        self.report.gathers.append(f"{node.name}: {reason}; written on the full {root.name} (no shards until "
                                   "it is read sharded again)")
        self._track_alias(node, new)
        self.aliases.true_views.add(node)
        result = node.meta["val"]
        self.env[node] = Value(result.dim(), replicated=new) if isinstance(result, torch.Tensor) else new
        self._after_write(node)

    def _rebuild_aliases(self, root: fx.Node, reason: str, members: Optional[list] = None) -> dict:
        """Aliases of `root` recomputed from its full value by replaying their view ops (replicated), in the
        order they were made: all of them, or the `members` given. Returns old node -> new node. A rebuilt
        alias is a true view when the full value is the root's own storage."""
        rebuilt = {root: self.replicated(root, reason)}
        true = {root: not self.env[root].native_sharded}
        for member in self.aliases.members_of(root) if members is None else members:
            if member is root:
                continue
            parent = self.aliases.parent[member]
            if parent not in rebuilt:
                rebuilt[parent] = self.replicated(parent, reason)
                own = self._native_node(parent)
                true[parent] = self.aliases.is_true_view(parent) and own is not None and own is rebuilt[parent]
            base = rebuilt[parent]
            if member.target is operator.getitem:
                new = self.graph.call_function(operator.getitem, (base, member.args[1]))
            elif written_arguments(member):
                new = base  # an in-place op's result is the tensor it wrote into
            else:
                new = self._copy(member, lambda v: base if v is parent else self._map_plain(v, reason))
            rebuilt[member] = new
            true[member] = true[parent]
            result = member.meta["val"]
            if isinstance(result, torch.Tensor):
                self.env[member] = Value(result.dim(), replicated=new)
            elif is_tensor_list(result):
                self.env[member] = [Value(t.dim(), replicated=self.graph.call_function(operator.getitem, (new, i)))
                                    for i, t in enumerate(result)]
            if true[member]:
                self.aliases.true_views.add(member)
            else:
                self.aliases.true_views.discard(member)
        return rebuilt

    def _after_write(self, node: fx.Node) -> None:
        """After `node` wrote into the storage of some alias root: copies of its aliases are stale, and
        aliases that are not true views of the root are rebuilt from it."""
        written = self._written_nodes(node)
        for target in written:
            root = self.aliases.root_of(target)
            for member in self.aliases.members_of(root):
                value = self.env.get(member)
                if isinstance(value, Value):
                    value.forget_copies()
            stale = self.aliases.stale_read_later(root, node, self.position)
            for member in self.aliases.members_of(root):
                if not self.aliases.is_true_view(member) and member not in stale and isinstance(self.env.get(member), Value):
                    self.env[member] = Value(self.env[member].ndim)  # never read again: nothing to hold
            if stale:
                self._rebuild_aliases(root, f"{describe_node(node)} wrote into {root.name}", stale)

    def _track_alias(self, node: fx.Node, new: Optional[fx.Node] = None) -> None:
        """`node` joins its input's alias root; it read the input's own representation when that node is
        among the inputs of `new`, the op the rewrite emitted for it."""
        def read_own(parent: fx.Node) -> bool:
            native = self._native_node(parent)
            return new is not None and native is not None and native in new.all_input_nodes

        self.aliases.track(node, read_own)


def _first_layout(required) -> TokenLayout:
    for entry in required:
        for layout in (entry if isinstance(entry, list) else [entry]):
            if isinstance(layout, TokenLayout):
                return layout
    raise AssertionError("a rule with a patch must shard some input")


def shard_tokens(gm: fx.GraphModule, group: ProcessGroupInfo, report: Report, attention_strategy,
                 mesh=None, demands: Optional[dict] = None) -> fx.GraphModule:
    """Plans the sharding of `gm` (sharding_plan.py), then applies the plan in one rewrite. `demands`
    defaults to the token axes that feed self-attention (find_token_dims)."""
    plan = plan_sharding(gm, group.size, attention_strategy, demands)
    rewriter = TokenShardingRewriter(gm, group, report, attention_strategy, mesh, plan)
    result = rewriter.run()
    report.notes.extend(plan.describe())
    missed = rewriter.missed_cuts()
    if missed:
        # The plan predicts the rewrite's layouts; a re-split it did not foresee costs a gather, never
        # correctness (the rewrite converts what it is given). Said, so that a test or a user sees it.
        report.notes.append("the plan missed re-splits that other cuts would have avoided: "
                            + ", ".join(f"{node.name} with segments {[str(s) for s in segments]}"
                                        for node, segments in missed.items()))
    return result
