"""The sharding plan: what the token pass will do, worked out on the original graph before it is rewritten.

Invariant: `plan_sharding` reads the original graph (global shapes in node.meta["val"]) and the rule
registry and emits no node. Its ShardingPlan says which tensors carry the axis (demands), where shards are
first cut and with which segments (cuts), each node's layout, what each attention becomes (an
AttentionSite from the attention strategy), and which values are gathered and why. shard_tokens.py then
applies the plan in one rewrite: it cuts the plan's sources with the plan's segments.

How the plan settles segments: a source is cut with one segment by default. When a later op needs that
value split the way a concatenation split its other operand (the rotary table times the joint text and
image queries), planning that layout would re-split it, which is a gather. The planner then cuts the
source with the segments its users need (found back through ops that keep the split, and through
concatenations along the token axis, each operand taking the run of segments over its own tokens) and plans
again, until no source would be re-cut (at most `rounds` plans; a plan is a walk over layouts, cheap next to
a rewrite).

The layouts follow the rewrite's own decisions: the same rule with the same conversion costs, the same
attention strategy, the same treatment of in-place writes. tests/test_plans.py checks that the rewrite
does what its plan says on whole models.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from paracompile.explain import describe_node
from paracompile.passes.sharding_rules import ANY, OpView, is_size_query, is_tensor_node, normalize_dim, rule_for
from paracompile.passes.token_layout import TokenLayout, same_size

aten = torch.ops.aten
ATTENTION = aten.scaled_dot_product_attention.default


def attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "call_function" and node.target is ATTENTION]


def self_attention_head_counts(graph: fx.Graph) -> list[int]:
    """Head counts of the attentions whose queries and keys have the same token count."""
    counts = []
    for node in attention_nodes(graph):
        view = OpView(node, lambda _: None)
        query_shape, key_shape = view.shape(view["query"]), view.shape(view["key"])
        if len(query_shape) >= 3 and same_size(query_shape[-2], key_shape[-2]) and isinstance(query_shape[-3], int):
            counts.append(query_shape[-3])
    return counts


# ----------------------------------------------------------------------------------------------------
# Demands: which nodes carry the axis, and at which dim

def find_token_dims(graph: fx.Graph) -> dict[fx.Node, int]:
    """For each node that feeds the token axis of some self-attention: the dim of its token axis."""
    seeds = []
    for node in attention_nodes(graph):
        view = OpView(node, lambda _: None)
        query, key = view["query"], view["key"]
        token_dim = len(view.shape(query)) - 2
        seeds.append((query, token_dim))
        if same_size(view.shape(query)[token_dim], view.shape(key)[token_dim]):
            # Self or joint attention. Cross-attention keeps its (short) keys and values replicated,
            # which needs no communication at all.
            seeds += [(key, token_dim), (view["value"], token_dim)]
    return find_axis_sources(seeds)


def find_axis_sources(seeds: list[tuple[fx.Node, int]]) -> dict[fx.Node, int]:
    """From (node, dim) seeds, walks back through the ops that have a rule: for each node reached, the
    dim at which it carries the seeds' axis."""
    demands: dict[fx.Node, int] = {}
    worklist: list[fx.Node] = []

    def demand(node: fx.Node, dim: int) -> None:
        if node not in demands:
            demands[node] = dim
            worklist.append(node)

    for node, dim in seeds:
        demand(node, dim)

    while worklist:
        node = worklist.pop()
        dim = demands[node]
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            demand(node.args[0], dim)
            continue
        rule = rule_for(node)
        if rule is None or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for producer in tensor_inputs(node):
            if producer in demands:
                continue
            shape = producer.meta["val"].shape
            for candidate in range(len(shape)):
                if same_size(shape[candidate], 1):
                    continue
                trial = {producer: TokenLayout(candidate, (shape[candidate],))}
                try:
                    sharding = rule(OpView(node, trial.get))
                except Exception:  # a rule that cannot reason about this combination: no demand
                    sharding = None
                if sharding is None:
                    continue
                output = sharding.output[0] if isinstance(sharding.output, list) else sharding.output
                if output is not None and output.dim == dim:
                    demand(producer, candidate)
                    break
    return demands


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found = []
    for value in list(node.args) + list(node.kwargs.values()):
        values = value if isinstance(value, (list, tuple)) else [value]
        found.extend(v for v in values if is_tensor_node(v) and v not in found)
    return found


# ----------------------------------------------------------------------------------------------------
# The plan

@dataclass(frozen=True)
class AttentionSite:
    """What one attention node becomes: `kind` is "replicated" (with `reason`), "local" (sharded queries,
    full keys and values), "ulysses", "ring" or "batch". `inputs` maps argument names to the layout each
    is used with (None: the full tensor); `output` is the result's layout (None: replicated)."""

    kind: str
    reason: str = ""
    inputs: dict = field(default_factory=dict)
    output: Optional[TokenLayout] = None


@dataclass
class ShardingPlan:
    demands: dict[fx.Node, int]
    cuts: dict[fx.Node, TokenLayout] = field(default_factory=dict)
    layouts: dict[fx.Node, Optional[TokenLayout]] = field(default_factory=dict)
    attention: dict[fx.Node, AttentionSite] = field(default_factory=dict)
    gathers: list[tuple[fx.Node, str]] = field(default_factory=list)
    rounds: int = 1

    def segments_of_cut(self, node: fx.Node, length) -> tuple:
        cut = self.cuts.get(node)
        return cut.segments if cut is not None else (length,)

    def describe(self) -> list[str]:
        sharded = sum(1 for layout in self.layouts.values() if layout is not None)
        kinds: dict[str, int] = {}
        for site in self.attention.values():
            kinds[site.kind] = kinds.get(site.kind, 0) + 1
        attention = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        settled = [f"{node.name} cut with segments {[str(s) for s in layout.segments]}"
                   for node, layout in self.cuts.items() if len(layout.segments) > 1]
        return [f"plan: {len(self.cuts)} cuts, {sharded} token-sharded values, {len(self.gathers)} gathers, "
                f"attention {attention}; settled in {self.rounds} planning round(s)"
                + (f" ({'; '.join(settled)})" if settled else "")]


@dataclass
class _Planned:
    """What the rewrite will hold for one tensor: whether its full value is at hand, the layout of its
    shard if it has one, and which of the two the op produced (the other is derived)."""

    layout: Optional[TokenLayout] = None
    full: bool = True
    native_sharded: bool = False
    resliced: set = field(default_factory=set)

    def forget_copies(self) -> None:
        self.resliced = set()
        if self.native_sharded:
            self.full = False
        else:
            self.layout = None


def plan_sharding(gm: fx.GraphModule, group_size: int, attention_strategy, demands: Optional[dict] = None,
                  rounds: int = 3) -> ShardingPlan:
    """The plan for sharding `gm`'s token axis (or, with `demands` from shard_batch, its batch axis) over a
    group of `group_size` ranks; `attention_strategy.plan(node, layout_of)` says what each attention
    becomes."""
    demands = find_token_dims(gm.graph) if demands is None else demands
    segments: dict[fx.Node, tuple] = {}
    for round_number in range(1, rounds + 1):
        planner = _Planner(gm, group_size, attention_strategy, demands, segments)
        plan = planner.run()
        plan.rounds = round_number
        better = planner.better_source_segments()
        if len(better) == len(segments):
            return plan
        segments = better
    return plan


SHARDED, REPLICATED, WRITE_FULL = "sharded", "replicated", "write_full"


def decide(node: fx.Node, layout_of, cost, native_sharded, aliases: "Aliases") -> tuple[str, Any]:
    """What the token pass does with one op node, asked alike by the plan and by the rewrite: SHARDED with the
    rule's Sharding, REPLICATED (no input sharded, or no rule for these layouts), or WRITE_FULL (an in-place
    write whose target's own storage the op would not be given: it runs on the full tensor).
    `native_sharded(node)`: whether the op that made `node` produced its shard (else its full value)."""
    def own_storage(required: dict) -> bool:
        return writes_own_storage(node, required, layout_of, native_sharded, aliases)

    if any(layout_of(n) is not None for n in tensor_inputs(node)):
        rule = rule_for(node)
        sharding = rule(OpView(node, layout_of, cost)) if rule is not None else None
        if sharding is not None:
            return (SHARDED, sharding) if own_storage(sharding.inputs) else (WRITE_FULL, None)
    return (REPLICATED, None) if own_storage({}) else (WRITE_FULL, None)


def writes_own_storage(node: fx.Node, required: dict, layout_of, native_sharded, aliases: "Aliases") -> bool:
    """Whether every argument `node` writes into is a true view whose own representation is the one the op is
    given (`required`: the layouts the op's rule asks for, by argument name; None: replicated)."""
    names = written_arguments(node)
    if not names:
        return True
    arguments = OpView(node, layout_of).args
    for name in names:
        target = arguments[name]
        if not is_tensor_node(target):
            continue
        wanted = required.get(name)
        if isinstance(wanted, list) or wanted is ANY:
            return False
        sharded = native_sharded(target)
        own = (not sharded and wanted is None) or (sharded and wanted is not None and layout_of(target) == wanted)
        if not own or not aliases.is_true_view(target):
            return False
    return True


class _Planner:
    """One walk over the graph in order, following the rewrite's decisions on layouts alone."""

    def __init__(self, gm, group_size, attention_strategy, demands, source_segments):
        self.gm, self.group_size, self.attention_strategy = gm, group_size, attention_strategy
        self.source_segments = source_segments
        self.plan = ShardingPlan(demands=demands)
        self.values: dict[fx.Node, Any] = {}
        self.resplits: list[tuple[fx.Node, TokenLayout]] = []
        self.aliases = Aliases()
        self.position = {node: index for index, node in enumerate(gm.graph.nodes)}

    def run(self) -> ShardingPlan:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self._bind_full(node)
            elif node.op == "output":
                self._need_full_all(node.args[0], "graph output")
            elif node.target is ATTENTION:
                self._attention(node)
            else:
                self._call(node)
        for node, value in self.values.items():
            if isinstance(value, _Planned):
                self.plan.layouts[node] = value.layout if value.native_sharded else None
        return self.plan

    # Layouts and conversions, as the rewrite makes them ------------------------------------------
    def layout_of(self, node: fx.Node) -> Optional[TokenLayout]:
        value = self.values.get(node)
        return value.layout if isinstance(value, _Planned) else None

    def cost(self, node: fx.Node, layout: TokenLayout) -> int:
        value = self.values.get(node)
        if not isinstance(value, _Planned):
            return 0
        if (value.layout is not None and value.layout == layout) or layout.key() in value.resliced:
            return 0
        return 0 if value.full else 1

    def need_full(self, node: fx.Node, reason: str) -> None:
        value = self.values.get(node)
        if isinstance(value, _Planned) and not value.full:
            value.full = True
            self.plan.gathers.append((node, reason))

    def need_sharded(self, node: fx.Node, layout: TokenLayout, reason: str) -> None:
        value = self.values[node]
        if (value.layout is not None and value.layout == layout) or layout.key() in value.resliced:
            return
        if not value.full:
            self.resplits.append((node, layout))
            self.need_full(node, f"re-split from {value.layout.describe()} to {layout.describe()} for {reason}")
        value.resliced.add(layout.key())

    def _convert(self, node: fx.Node, required: Any, reason: str) -> None:
        if required is ANY:
            return
        if required is None:
            self.need_full(node, f"{reason} needs it whole")
        else:
            self.need_sharded(node, required, reason)

    def _need_full_all(self, value: Any, reason: str) -> None:
        if isinstance(value, fx.Node):
            self.need_full(value, reason)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._need_full_all(item, reason)

    def _bind_full(self, node: fx.Node) -> None:
        result = node.meta.get("val")
        if isinstance(result, torch.Tensor):
            self.values[node] = _Planned()
            self._cut_if_demanded(node)
        elif is_tensor_list(result):
            self.values[node] = [_Planned() for _ in result]

    def _cut_if_demanded(self, node: fx.Node) -> None:
        value = self.values[node]
        dim = self.plan.demands.get(node)
        if dim is None or value.layout is not None:
            return
        length = node.meta["val"].shape[dim]
        if same_size(length, 1) or (isinstance(length, int) and length < self.group_size):
            return
        layout = TokenLayout(dim, self.source_segments.get(node, (length,)))
        value.layout = layout
        self.plan.cuts[node] = layout

    # Nodes -----------------------------------------------------------------------------------------
    def _attention(self, node: fx.Node) -> None:
        site = self.attention_strategy.plan(node, self.layout_of)
        self.plan.attention[node] = site
        view = OpView(node, self.layout_of)
        for name in ("query", "key", "value", "attn_mask"):
            if is_tensor_node(view.args[name]):
                self._convert(view.args[name], site.inputs.get(name), describe_node(node))
        if site.output is None:
            self.values[node] = _Planned()
        else:
            self.values[node] = _Planned(layout=site.output, full=False, native_sharded=True)

    def _call(self, node: fx.Node) -> None:
        if node.target is operator.getitem and isinstance(self.values.get(node.args[0]), list):
            self.values[node] = self.values[node.args[0]][node.args[1]]
            self.aliases.track(node, lambda parent: True)
            return
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor) and not is_tensor_list(result):
            if not (is_size_query(node.target) and self.layout_of(node.args[0]) is not None
                    and not self.values[node.args[0]].full):
                self._need_full_all(list(node.args) + list(node.kwargs.values()), f"{describe_node(node)} reads values")
            return
        inputs = tensor_inputs(node)
        kind, sharding = decide(node, self.layout_of, self.cost, lambda n: self.values[n].native_sharded, self.aliases)
        if kind == WRITE_FULL:
            self._write_into_full_tensor(node)
            return
        if kind == SHARDED:
            self._sharded(node, sharding)
            return
        reason = describe_node(node)
        for producer in inputs:
            self.need_full(producer, f"{reason} needs it whole")
        self._after_write(node)
        self.aliases.track(node, lambda parent: not self.values[parent].native_sharded)
        if isinstance(result, torch.Tensor):
            self.values[node] = _Planned()
            self._cut_if_demanded(node)
        else:
            self.values[node] = [_Planned() for _ in result]

    def _sharded(self, node: fx.Node, sharding) -> None:
        view = OpView(node, self.layout_of)
        reason = describe_node(node)
        for name, value in view.args.items():
            required = sharding.inputs.get(name)
            if isinstance(value, (list, tuple)) and any(is_tensor_node(v) for v in value):
                required = required if isinstance(required, list) else [None] * len(value)
                for item, item_required in zip(value, required):
                    if is_tensor_node(item):
                        self._convert(item, item_required, reason)
            elif is_tensor_node(value):
                self._convert(value, required, reason)
            elif isinstance(value, fx.Node):
                self.need_full(value, reason)
        self._after_write(node)
        inputs = tensor_inputs(node)
        read_native = False
        if inputs:
            parent = inputs[0]
            name = next((n for n, v in view.args.items() if v is parent), None)
            wanted = sharding.inputs.get(name) if name is not None else None
            own = self.values[parent]
            read_native = wanted is ANY or (own.native_sharded and isinstance(wanted, TokenLayout)
                                            and own.layout == wanted) or (not own.native_sharded and wanted is None)
        self.aliases.track(node, lambda parent: read_native)
        if sharding.output is None:
            self.values[node] = _Planned()
            self._cut_if_demanded(node)
        elif isinstance(sharding.output, list):
            self.values[node] = [_Planned(layout=layout, full=False, native_sharded=True) for layout in sharding.output]
        else:
            self.values[node] = _Planned(layout=sharding.output, full=False, native_sharded=True)

    # In-place writes (shard_tokens.py explains the rule; `decide` says when one runs on the full tensor) --
    def _write_into_full_tensor(self, node: fx.Node) -> None:
        arguments = OpView(node, self.layout_of).args
        written = [arguments[name] for name in written_arguments(node) if is_tensor_node(arguments[name])]
        root = self.aliases.root_of(written[0])
        reason = f"{describe_node(node)} writes in place into it through a view the shards cannot follow"
        self.need_full(root, reason)
        for member in self.aliases.members_of(root):
            self.values[member] = _Planned()
            self.aliases.true_views.add(member)
        for producer in tensor_inputs(node):
            self.need_full(producer, reason)
        self.aliases.track(node, lambda parent: True)
        self.values[node] = _Planned()

    def _after_write(self, node: fx.Node) -> None:
        arguments = OpView(node, self.layout_of).args if isinstance(node.target, torch._ops.OpOverload) else {}
        for name in written_arguments(node):
            target = arguments.get(name)
            if not is_tensor_node(target):
                continue
            root = self.aliases.root_of(target)
            members = self.aliases.members_of(root)
            for member in members:
                value = self.values.get(member)
                if isinstance(value, _Planned):
                    value.forget_copies()
            stale = self.aliases.stale_read_later(root, node, self.position)
            for member in members:
                if not self.aliases.is_true_view(member):
                    self.values[member] = _Planned()
            # The rewrite rebuilds the stale aliases read later from the full root, each from its parent.
            reason = f"{describe_node(node)} wrote into {root.name}"
            rebuilt = {root} if stale else set()
            if stale:
                self.need_full(root, reason)
            for member in stale:
                parent = self.aliases.parent[member]
                if parent not in rebuilt:
                    self.need_full(parent, reason)
                    rebuilt.add(parent)
                rebuilt.add(member)

    # Segments --------------------------------------------------------------------------------------
    def better_source_segments(self) -> dict[fx.Node, tuple]:
        return better_source_segments(self.resplits, self.layout_of, set(self.plan.cuts), self.source_segments)


class Aliases:
    """Which tensors share storage: each alias root with the views made from it, in order, and which of those
    are true views, whose writes reach the root's own storage (shard_tokens.py states the rule). The rewrite and
    the plan track aliases alike; they differ only in how they tell that an op read its input's own
    representation."""

    def __init__(self):
        self.root: dict[fx.Node, fx.Node] = {}
        self.members: dict[fx.Node, list[fx.Node]] = {}
        self.parent: dict[fx.Node, fx.Node] = {}
        self.true_views: set[fx.Node] = set()

    def root_of(self, node: fx.Node) -> fx.Node:
        return self.root.get(node, node)

    def members_of(self, root: fx.Node) -> list[fx.Node]:
        return self.members.get(root, [root])

    def is_true_view(self, node: fx.Node) -> bool:
        return node not in self.parent or node in self.true_views

    def stale_read_later(self, root: fx.Node, write: fx.Node, position: dict[fx.Node, int]) -> list[fx.Node]:
        """The aliases of `root` that a write at `write` leaves stale (they are not true views) and that are
        read after it, directly or through a stale alias made from them, in the order they were made. Only
        these must be rebuilt from the written root: the others are never read again (CogVideoX's rotary
        update reads q through a reshape and an unbind, then writes the result back into q: those views die
        with the write, and rebuilding them would gather q for nothing)."""
        needed: set[fx.Node] = set()
        members = self.members_of(root)
        for member in reversed(members):
            if member is root or self.is_true_view(member):
                continue
            read_later = any(position[user] > position[write] for user in member.users)
            if read_later or any(self.parent.get(other) is member for other in needed):
                needed.add(member)
        return [member for member in members if member in needed]

    def track(self, node: fx.Node, read_own: Callable[[fx.Node], bool]) -> None:
        """Ops whose output is a view of (or the same storage as) their first input join its alias root. The
        output is a true view when the input is one, the op read the input's own representation
        (`read_own(input)`), and the op is a view wherever it runs (not `reshape` or `contiguous`, which copy
        or not by layout; a `.to` that changes nothing returns its input itself)."""
        if node.target is operator.getitem:
            parent = node.args[0]
            if parent in self.root:
                self._join(node, parent, self.is_true_view(parent))
            return
        target = node.target
        if not isinstance(target, torch._ops.OpOverload) or not target._schema.returns:
            return
        if target._schema.returns[0].alias_info is None:
            return
        inputs = tensor_inputs(node)
        if not inputs:
            return
        parent = inputs[0]
        true = (self.is_true_view(parent) and read_own(parent)
                and (target.overloadpacket in DEFINITE_VIEWS or bool(written_arguments(node))
                     or returns_its_input(node, parent)))
        self._join(node, parent, true)

    def _join(self, node: fx.Node, parent: fx.Node, true: bool) -> None:
        root = self.root_of(parent)
        self.root[node] = root
        self.parent[node] = parent
        self.members.setdefault(root, [root]).append(node)
        if true:
            self.true_views.add(node)


def better_source_segments(resplits, layout_of, cut_sources: set, segments: dict) -> dict[fx.Node, tuple]:
    """For each re-split: the cut source whose cut, made with the needed segments instead, would have made
    the re-split unnecessary. A source qualifies when the re-split value descends from it through ops that
    kept the segments unchanged, or through concatenations along the token axis, whose operands each need
    the run of the needed segments that covers their own tokens (Z-Image's rotary table: its image part,
    one segment, meets image tokens that are real and padding ones, two). Returns `segments` with those
    added (a source already there keeps its)."""
    better = dict(segments)
    for node, needed in resplits:
        have = layout_of(node)
        if have is None or not same_size(have.length, needed.length):
            continue
        frontier, seen = [(node, have, tuple(needed.segments))], set()
        while frontier:
            current, current_have, wanted = frontier.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in cut_sources:
                if current not in better:
                    better[current] = wanted
                continue
            frontier.extend(_producers_needing(current, current_have, wanted, layout_of))
    return better


def _producers_needing(node: fx.Node, have: TokenLayout, wanted: tuple, layout_of) -> list[tuple]:
    """(producer, its layout, the segments it would need) for the producers of `node` that carry its split:
    the same split, or, for a concatenation along the token axis, each sharded operand's run of `wanted`.
    A `getitem` of a list-valued op (a split) looks through to that op's inputs."""
    source = node
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and not is_tensor_node(node.args[0]):
        source = node.args[0]
    found = []
    for producer in tensor_inputs(source):
        layout = layout_of(producer)
        if layout is not None and layout.same_split(have):
            found.append((producer, layout, wanted))
    if found or source.target not in CONCATENATIONS or not source.args:
        return found
    shape = source.meta["val"].shape
    if normalize_dim(source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0), len(shape)) != have.dim:
        return found
    first = 0
    for operand in source.args[0]:
        if not is_tensor_node(operand) or operand.meta["val"].dim() != len(shape):
            continue  # a legacy empty 1-D tensor, which cat skips
        layout = layout_of(operand)
        count = len(layout.segments) if layout is not None and layout.dim == have.dim else 1
        run = _run_of(wanted, sum(have.segments[:first], 0), sum(have.segments[first:first + count], 0))
        if run is not None and layout is not None and layout.dim == have.dim:
            found.append((operand, layout, run))
        first += count
    return found


def _run_of(segments: tuple, start, end) -> Optional[tuple]:
    """The segments that exactly cover tokens [start, end), or None when no segment boundaries fall there."""
    position, run, inside = 0, [], same_size(start, 0)
    for segment in segments:
        if not inside and same_size(position, start):
            inside = True
        if inside:
            run.append(segment)
        position = position + segment
        if inside and same_size(position, end):
            return tuple(run)
    return None


CONCATENATIONS = {aten.cat.default}


# Ops whose result is a view of their input wherever they run, on a full tensor or a shard (the rules
# rewrite `view` to `reshape`, which stays a view on shards cut by slicing along one dim).
DEFINITE_VIEWS = {
    aten.view, aten.select, aten.slice, aten.narrow, aten.transpose, aten.permute, aten.t, aten.unsqueeze,
    aten.squeeze, aten.expand, aten.alias, aten.detach, aten.movedim, aten.diagonal, aten.unfold,
    aten.view_as_real, aten.view_as_complex, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
    aten.tensor_split, aten.swapaxes, aten.swapdims, aten.as_strided, aten.unflatten,
}


def returns_its_input(node: fx.Node, parent: fx.Node) -> bool:
    """Whether `node` is a conversion (`aten.to`) that changes nothing and so returns its input itself, on a
    full tensor or a shard alike (CogView4's `norm_q(query).to(query.dtype)` before its in-place rotary write
    into a slice of the result): dtype and device kept, no copy asked for, no memory format forced."""
    if node.target.overloadpacket is not aten.to:
        return False
    result, source = node.meta.get("val"), parent.meta.get("val")
    if not isinstance(result, torch.Tensor) or not isinstance(source, torch.Tensor):
        return False
    arguments = OpView(node, lambda _: None).args
    return (result.dtype == source.dtype and result.device == source.device and not arguments.get("copy")
            and arguments.get("memory_format") in (None, torch.preserve_format))


def written_arguments(node: fx.Node) -> list[str]:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return []
    return [a.name for a in target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def is_tensor_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value)
