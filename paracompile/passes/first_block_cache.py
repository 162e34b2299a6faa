"""First Block Cache (FBCache): skip a DiT's blocks on the denoising steps where the first block's
residual barely changed.

Invariant: the callable this pass returns computes, on a miss, exactly what the graph computes (every node
runs once, in graph order, split into three compiled parts), and on a hit what the graph's tail computes
when each stream leaving the block region is replaced by (its value after block 0) + (the residual the
region added to it at the slot's last miss). The decision reads one scalar that every rank computes from
the same all-reduced sums, so all ranks take the same branch.

How the graph is split (by position in the graph, which is execution order):
- The block loop (block_loop.py) is the ModuleList(s) found in `nn_module_stack`: the outermost lists whose children hold
  attention. Lists at the same (smallest) depth that run one after another (FLUX's `transformer_blocks`
  then `single_transformer_blocks`) form one region. Block 0 is child 0 of the first list.
- head: everything up to and including block 0's last node. rest: from there to the last node of the
  region's last block. tail: everything after.
- A value the tail reads from the rest must be a stream end: a tensor that, followed back through residual
  additions (`x + f(x)`), casts, slices and concatenations, is exactly one value of the head (the stream's
  value after block 0) with the same shape (residual_streams.py). Rest nodes the tail needs that do not depend on block work
  (sizes, tables computed from the inputs) move into the head; anything else disables the cache.
- The hidden stream (the one whose token axis feeds the output) decides: r = (its value after block 0) -
  (block 0's input on that stream), computed in the head.

Shapes come from `meta["val"]`; after sharding they are this rank's local shapes (the graph is fake-tensor
propagated first). The choices follow the graph's structure (module stacks, residual paths, slice bounds),
which is the same on every rank; the runtime still checks, with the decision's all-reduce, that every rank
made the same plan, and turns the cache off if not.
"""
from __future__ import annotations

import dataclasses
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from paracompile.cache import FirstBlockCache
from paracompile.context import CompileContext
from paracompile.explain import describe_node, shape_text
from paracompile.options import Options
from paracompile.passes.block_loop import BlockRegion, CacheUnavailable, block_of, dotted, find_block_region
from paracompile.passes.residual_streams import is_tensor, known_equal, residual_sources, val
from paracompile.passes.sharding_rules import is_size_query
from paracompile.passes.trace_to_aten import aten_graph_with_values
from paracompile.runtime import model_state_positions, readable_input_name

aten = torch.ops.aten
HEAD, REST, TAIL = "head", "rest", "tail"


# ----------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Stream:
    start: fx.Node  # its value after block 0 (a head node)
    end: fx.Node  # its value after the region (a rest node the tail reads)


@dataclass
class CachePlan:
    region: BlockRegion
    part: dict  # node -> HEAD / REST / TAIL (placeholders and get_attr nodes are in none)
    streams: list[Stream]
    hidden: int  # index into streams
    hidden_input: fx.Node  # block 0's input on the hidden stream
    carried: list[fx.Node]  # block 0's outputs that are residual streams (cached or not)
    size_substitutes: dict = field(default_factory=dict)  # rest size node -> equivalent value for the tail
    moved_to_head: list[fx.Node] = field(default_factory=list)
    timestep_index: Optional[int] = None
    timestep_name: Optional[str] = None
    front_blocks: int = 1  # run on every call, and their residual decides
    back_blocks: int = 0  # run on every call, after the cached region

    @property
    def cached_blocks(self) -> list:
        return self.region.blocks[self.front_blocks:len(self.region.blocks) - self.back_blocks]

    def signature(self) -> str:
        """The structural choices, in words that are the same on every rank when the choices are."""
        streams = ";".join(f"{_where(s.start)}>{_where(s.end)}" for s in self.streams)
        return (f"{self.region.describe_lists()}|F{self.front_blocks}B{self.back_blocks}|{streams}|{self.hidden}|"
                f"{_where(self.hidden_input)}|{len(self.moved_to_head)}|{self.timestep_name}")


def _block_name(block) -> str:
    return f"{dotted(block[0])}.{block[1]}"


def _where(node: fx.Node) -> str:
    block = block_of(node)
    place = f"{dotted(block[0])}.{block[1]}" if block else "-"
    return f"{getattr(node.target, '__name__', node.target)}@{place}"


def _member_of(blocks: list) -> Callable[[fx.Node], bool]:
    """Whether a node is an op of one of `blocks`: its module stack says so, or it unpacks an op of one (the
    sharding pass leaves its getitem nodes without a stack)."""
    blocks = set(blocks)

    def member(node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return member(node.args[0])
        return block_of(node) in blocks

    return member


def _is_size_node(node: fx.Node) -> bool:
    """Pure size arithmetic on graph inputs (sym_size of an input, sums of sizes): cheap, so every part that
    needs it recomputes it rather than receiving it from another part."""
    value = val(node)
    if node.op != "call_function" or value is None or isinstance(value, (torch.Tensor, list, tuple)):
        return False
    if isinstance(node.target, torch._ops.OpOverload) and not is_size_query(node.target):
        return False
    return all(argument.op == "placeholder" or _is_size_node(argument) for argument in node.all_input_nodes)


def plan_cache(gm: fx.GraphModule, timestep_arg: str, front_blocks: int = 1, back_blocks: int = 0) -> CachePlan:
    """`front_blocks` always run and decide (1: First Block Cache; more: DBCache's Fn), `back_blocks` always
    run after the cached region (DBCache's Bn)."""
    nodes = list(gm.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    region = find_block_region(nodes)
    count = len(region.blocks)
    if front_blocks + back_blocks >= count:
        raise CacheUnavailable(
            f"the block loop has {count} blocks; {front_blocks} front and {back_blocks} back block(s) that always "
            "run leave none to skip (fbcache_front_blocks + fbcache_back_blocks must be below the block count)")
    front = region.blocks[:front_blocks]
    head_end = region.positions[front[-1]][1]
    region_end = region.positions[region.blocks[count - back_blocks - 1]][1]

    part: dict[fx.Node, str] = {}
    for node in nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.target is operator.getitem and node.args[0] in part:
            part[node] = part[node.args[0]]  # unpacking lives with the op it unpacks
        elif position[node] <= head_end:
            part[node] = HEAD
        elif position[node] <= region_end:
            part[node] = REST
        else:
            part[node] = TAIL
    if not any(p == REST for p in part.values()):
        raise CacheUnavailable("nothing runs between the front blocks and the back blocks of the block loop")

    # Rest nodes that need nothing from block work (neither a block's node nor anything computed from one)
    # can run in the head, where a hit still computes them.
    region_blocks = set(region.blocks)
    block_work: set = set()
    independent: set = set()
    for node in nodes:
        if node.op != "call_function":
            continue
        if block_of(node) in region_blocks or any(argument in block_work for argument in node.all_input_nodes):
            block_work.add(node)
        elif part.get(node) == REST:
            independent.add(node)

    output_node = nodes[-1]
    tail_users = [n for n in nodes if part.get(n) == TAIL] + [output_node]
    needed = []
    for user in tail_users:
        for argument in user.all_input_nodes:
            if part.get(argument) == REST and argument not in needed:
                needed.append(argument)

    moved: list[fx.Node] = []
    size_substitutes: dict = {}
    ends: list[fx.Node] = []
    for node in needed:
        if node in independent:
            _move_to_head(node, part, moved)
        elif is_tensor(node):
            ends.append(node)
        elif isinstance(val(node), (int, torch.SymInt)):
            size_substitutes[node] = _equivalent_size(node, nodes, part)
        else:
            raise CacheUnavailable(f"the code after the block loop reads {describe_node(node)}, a non-tensor "
                                   "value computed inside it")
    if not ends:
        raise CacheUnavailable("nothing after the block loop reads a value the loop computes")

    streams = []
    for end in ends:
        sources = residual_sources(end, stop=lambda n: n.op == "placeholder" or part.get(n) == HEAD)
        if len(sources) != 1:
            found = ", ".join(describe_node(s) for s, _ in sources) or "none"
            raise CacheUnavailable(
                f"the code after the block loop reads {describe_node(end)}, which is not one residual stream "
                f"carried from block 0 (stream values found after block 0: {found})")
        streams.append(Stream(sources[0][0], end))
    if len({s.start for s in streams}) != len(streams):
        raise CacheUnavailable("two values read after the block loop come from the same stream after block 0")

    in_front = _member_of(front)
    hidden = _hidden_stream(streams)
    out0 = streams[hidden].start
    if not in_front(out0):
        raise CacheUnavailable(f"the stream that feeds the output ({describe_node(out0)}) does not pass through "
                               "the front blocks, so their residual says nothing about it")
    inputs = [s for s, added in residual_sources(out0, stop=lambda n: not in_front(n)) if added]
    if len(inputs) != 1:
        raise CacheUnavailable(f"cannot tell the front blocks' input on the stream {describe_node(out0)} "
                               f"(found {[describe_node(s) for s in inputs]})")

    carried = []
    for node in nodes:
        if part.get(node) == HEAD and in_front(node) and is_tensor(node) and \
                any(part.get(user) == REST for user in node.users) and \
                any(added for _, added in residual_sources(node, stop=lambda n: not in_front(n))):
            carried.append(node)

    for node in nodes:
        if part.get(node) != REST:
            continue
        for written in _written_arguments(node):
            if part.get(written) != REST:
                raise CacheUnavailable(f"{describe_node(node)} inside the block loop writes in place into "
                                       f"{describe_node(written)}, which lives outside it")

    timestep_index, timestep_name = _find_timestep(nodes, timestep_arg)
    return CachePlan(region, part, streams, hidden, inputs[0], carried, size_substitutes, moved,
                     timestep_index, timestep_name, front_blocks, back_blocks)


def _move_to_head(node: fx.Node, part: dict, moved: list) -> None:
    if part.get(node) != REST:
        return
    for argument in node.all_input_nodes:
        _move_to_head(argument, part, moved)
    part[node] = HEAD
    moved.append(node)
    for user in node.users:  # its unpacking goes with it
        if user.target is operator.getitem and part.get(user) == REST:
            part[user] = HEAD
            moved.append(user)


def _equivalent_size(node: fx.Node, nodes: list[fx.Node], part: dict):
    """A size computed inside the loop that the tail reads: a constant, or an equal size outside the loop."""
    value = val(node)
    if isinstance(value, int):
        return value
    for candidate in nodes:
        if candidate.op == "placeholder" or part.get(candidate) == HEAD:
            other = val(candidate)
            if isinstance(other, torch.SymInt) and known_equal(other, value):
                return candidate
    raise CacheUnavailable(f"the code after the block loop reads the size {describe_node(node)} ({value}), "
                           "computed inside the loop, and no equal size exists outside it")


def _hidden_stream(streams: list[Stream]) -> int:
    """The stream whose token axis feeds the output: with several, the largest (the image or video tokens
    rather than text)."""
    if len(streams) == 1:
        return 0

    def size(stream):
        numel = val(stream.end).numel()
        return int(numel.node.hint) if isinstance(numel, torch.SymInt) and numel.node.hint is not None else int(numel)

    return max(range(len(streams)), key=lambda index: size(streams[index]))


def _written_arguments(node: fx.Node) -> list[fx.Node]:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return []
    written = []
    for index, argument in enumerate(target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
        if isinstance(value, fx.Node):
            written.append(value)
    return written


def _find_timestep(nodes: list[fx.Node], name: Optional[str]) -> tuple[Optional[int], Optional[str]]:
    """Dynamo names the placeholder of a forward argument `timestep` `L_timestep_`, or `L_kwargs_timestep_`
    when the forward takes **kwargs (diffusers' decorated forwards). It is a tensor (a Python float lifted
    into a 0-d tensor included) or a Python int (a SymInt input)."""
    if name is None:
        return None, None
    pattern = re.compile(rf"^L_(?:kwargs_)?{re.escape(name)}_$")
    placeholders = [node for node in nodes if node.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if pattern.match(str(node.target)) and (is_tensor(node) or isinstance(val(node), torch.SymInt)):
            return index, str(node.target)
    return None, None


# ----------------------------------------------------------------------------------------------------
# Splitting the graph


@dataclass
class SplitGraph:
    """Three graphs; each takes all original inputs first, then its own extra inputs.

    head(*inputs) -> [r, *stream starts, *values for rest, *values for tail]
    rest(*inputs, *values for rest, *stream starts) -> [*stream ends, *residuals (end - start)]
    tail(*inputs, *values for tail, *stream ends) -> the original outputs
    """

    head: fx.GraphModule
    rest: fx.GraphModule
    tail: fx.GraphModule
    stream_count: int
    head_to_rest: list[int]  # indices into head's outputs
    head_to_tail: list[int]
    example_values: dict  # part name -> list of example inputs (fake tensors, SymInts)


def split_graph(gm: fx.GraphModule, plan: CachePlan) -> SplitGraph:
    nodes = list(gm.graph.nodes)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    output_node = nodes[-1]
    part = plan.part
    streams = plan.streams

    def members(name):
        return [node for node in nodes if part.get(node) == name]

    def crossing(consumers, producer_part):
        """Values of `producer_part` that nodes in `consumers` read (size chains are recomputed instead)."""
        values = []
        for consumer in consumers:
            for argument in consumer.all_input_nodes:
                if part.get(argument) == producer_part and argument not in values and not _is_size_node(argument):
                    values.append(argument)
        return values

    head_nodes, rest_nodes, tail_nodes = members(HEAD), members(REST), members(TAIL)
    rest_reads = crossing(rest_nodes, HEAD)
    tail_reads = crossing(tail_nodes + [output_node], HEAD)
    for substitute in plan.size_substitutes.values():
        if isinstance(substitute, fx.Node) and part.get(substitute) == HEAD and not _is_size_node(substitute) \
                and substitute not in tail_reads:
            tail_reads.append(substitute)
    starts = [s.start for s in streams]
    rest_extra = rest_reads + [start for start in starts if start not in rest_reads]
    head_outputs: list[fx.Node] = []
    for node in starts + rest_reads + tail_reads:
        if node not in head_outputs:
            head_outputs.append(node)

    head = _PartBuilder(placeholders, [])
    head.copy(head_nodes)
    residual = head.graph.call_function(aten.sub.Tensor, (head.value(streams[plan.hidden].start),
                                                          head.value(plan.hidden_input)))
    head.graph.output(tuple([residual] + [head.value(n) for n in head_outputs]))

    rest = _PartBuilder(placeholders, rest_extra)
    rest.copy(rest_nodes)
    ends = [rest.value(s.end) for s in streams]
    residuals = [rest.graph.call_function(aten.sub.Tensor, (rest.value(s.end), rest.value(s.start))) for s in streams]
    rest.graph.output(tuple(ends + residuals))

    tail = _PartBuilder(placeholders, tail_reads + [s.end for s in streams])
    for size_node, substitute in plan.size_substitutes.items():
        tail.env[size_node] = tail.value(substitute) if isinstance(substitute, fx.Node) else substitute
    tail.copy(tail_nodes)
    tail.graph.output(fx.map_arg(output_node.args[0], tail.value))

    for part in (head, rest, tail):
        part.graph.lint()
    index = {node: i + 1 for i, node in enumerate(head_outputs)}  # +1: r comes first
    originals = [val(p) for p in placeholders]
    return SplitGraph(
        fx.GraphModule(gm, head.graph), fx.GraphModule(gm, rest.graph), fx.GraphModule(gm, tail.graph), len(streams),
        head_to_rest=[index[n] for n in rest_extra],
        head_to_tail=[index[n] for n in tail_reads],
        example_values={
            HEAD: originals,
            REST: originals + [val(n) for n in rest_extra],
            TAIL: originals + [val(n) for n in tail_reads] + [val(s.end) for s in streams],
        },
    )


class _PartBuilder:
    """One part's graph: all original inputs, then `extra` inputs, then copies of the part's nodes."""

    def __init__(self, placeholders: list[fx.Node], extra: list[fx.Node]):
        self.graph = fx.Graph()
        self.env: dict = {}
        for node in placeholders + extra:
            # An extra input may repeat an original one (a stream that is a graph input): it still takes
            # its own place in the signature.
            new = self.graph.placeholder(str(node.target) if node.op == "placeholder" and node not in self.env
                                         else f"{node.name}_input")
            new.meta.update(node.meta)
            self.env.setdefault(node, new)

    def value(self, node: fx.Node):
        """The part's copy of `node`; get_attr nodes and size arithmetic are copied in on first use."""
        if node not in self.env:
            if node.op != "get_attr" and not _is_size_node(node):
                raise AssertionError(f"first block cache split: {node.name} is read before it is available")
            for argument in node.all_input_nodes:
                self.value(argument)
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
        return self.env[node]

    def copy(self, members: list[fx.Node]) -> None:
        for node in members:
            for argument in node.all_input_nodes:
                self.value(argument)
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])


# ----------------------------------------------------------------------------------------------------
# Report


def describe_plan(plan: CachePlan, options: Options) -> list[str]:
    predictor = ("reuse the residual cached at the slot's last miss" if options.fbcache_taylorseer_order == 0 else
                 f"TaylorSeer order {options.fbcache_taylorseer_order} (the residual extrapolated from the slot's "
                 "last misses)")
    lines = [f"first block cache: threshold {options.threshold:g}, warmup {options.fbcache_warmup}, max hits in a "
             f"row {'unlimited' if options.fbcache_max_hits is None else options.fbcache_max_hits}",
             f"  on a hit: {predictor}"]
    region = plan.region
    lines.append(f"  block loop: {region.describe_lists()}")
    front = region.blocks[:plan.front_blocks]
    if len(front) == 1:
        lines.append(f"  first block (always runs): {_block_name(front[0])}")
    else:
        lines.append(f"  front blocks (always run, their residual decides): {_block_name(front[0])} .. "
                     f"{_block_name(front[-1])} ({len(front)} blocks)")
    cached = plan.cached_blocks
    lines.append(f"  cached region: {_block_name(cached[0])} .. {_block_name(cached[-1])} "
                 f"({len(cached)} block{'s' if len(cached) != 1 else ''}, skipped on a hit)")
    if plan.back_blocks:
        back = region.blocks[len(region.blocks) - plan.back_blocks:]
        lines.append(f"  back blocks (always run): {_block_name(back[0])} .. {_block_name(back[-1])} "
                     f"({len(back)} block{'s' if len(back) != 1 else ''})")
    cached_starts = {s.start for s in plan.streams}
    lines.append(f"  streams: {len(plan.streams)} cached")
    for index, stream in enumerate(plan.streams):
        role = "hidden, decides" if index == plan.hidden else "cached"
        lines.append(f"    - {describe_node(stream.start)} -> {describe_node(stream.end)}, local shape "
                     f"{shape_text(stream.end)} ({role})")
    unused = [node for node in plan.carried if node not in cached_starts]
    for node in unused:
        lines.append(f"    - {describe_node(node)}: carried by the blocks, unused after the loop (nothing to cache)")
    lines.append(f"  residual: {describe_node(plan.streams[plan.hidden].start)} - {describe_node(plan.hidden_input)}")
    if plan.moved_to_head:
        lines.append(f"  moved before the region (the code after it reads them, they need no block): "
                     f"{len(plan.moved_to_head)} nodes")
    if options.timestep_arg is None:
        lines.append("  timestep: none (timestep_arg=None); generations are not detected, call "
                     "paracompile.reset_cache() between them")
    elif plan.timestep_name is None:
        lines.append(f"  timestep: {options.timestep_arg} is a constant of this graph (Dynamo specialised it); "
                     "a call with another value compiles a graph that takes it as an input")
    else:
        lines.append(f"  timestep: input {plan.timestep_name} (a larger value than the last call's starts a generation)")
    return lines


# ----------------------------------------------------------------------------------------------------
# Entry point (called by backend.compile_graph when threshold > 0)


def compile_with_first_block_cache(gm: fx.GraphModule, example_inputs: list, context: CompileContext,
                                   compile_graph: Callable) -> Callable:
    """Compiles `gm` (Dynamo's graph at world size 1, the final aten graph otherwise) with the cache, or
    without it (and with a warning) when the graph has no block loop to cache. `compile_graph` compiles
    each part (the backend's, given the context with threshold 0); the cache's report goes to the
    context's records."""
    options = context.options
    plain = context.with_options(dataclasses.replace(options, threshold=0.0))
    # Inductor compiles the parts from these shapes, so the guards the propagation needs must hold; the
    # eager compiler runs real tensors, and a guard on this rank's local size would only make the ranks
    # recompile at different times.
    gm = aten_graph_with_values(gm, example_inputs, keep_guards=options.compiler != "eager")

    try:
        plan = plan_cache(gm, options.timestep_arg, options.fbcache_front_blocks, options.fbcache_back_blocks)
    except CacheUnavailable as error:
        warnings.warn(f"paracompile: threshold {options.threshold:g} but no First Block Cache for this graph: "
                      f"{error}; compiling it without the cache", stacklevel=2)
        context.record(f"first block cache: off ({error})")
        return compile_graph(gm, example_inputs, plain)

    _check_timestep_found(plan, options, gm)
    split = split_graph(gm, plan)
    report = "\n".join(describe_plan(plan, options))
    context.record(report)
    parts = {name: compile_graph(graph, split.example_values[name], plain, name=f"the cache's {name} part")
             for name, graph in ((HEAD, split.head), (REST, split.rest), (TAIL, split.tail))}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    # Inputs named after the module's state are its weights; the others are the call's data.
    weights = model_state_positions([node.target for node in placeholders])
    # By name, in a fixed order: every graph of the model lists the same tensors, whatever else it takes.
    data_inputs = sorted((i for i in range(len(placeholders)) if i not in weights),
                         key=lambda i: str(placeholders[i].target))
    signature = plan.signature()
    # The model's state is found by its first weight (the runtime's lookup) and this key: the block loop and
    # the cache options, the same for every graph Dynamo compiles of the model's forward.
    state_key = (plan.region.describe_lists(), options.threshold, options.fbcache_warmup, options.fbcache_max_hits,
                 options.fbcache_front_blocks, options.fbcache_back_blocks, options.fbcache_taylorseer_order)
    cache = FirstBlockCache(parts[HEAD], parts[REST], parts[TAIL], split, options, plan.timestep_index,
                            data_inputs, weights[0] if weights else None, state_key, signature, description=report)
    return cache


def _frame_arguments() -> list[str]:
    """The arguments of the compiled frame that Dynamo guards on (`L['timestep']`, `L['kwargs']['sigma']`):
    its inputs, also those it specialised into constants."""
    context = torch._guards.TracingContext.try_get()
    if context is None:
        return []
    names = []
    for guard in context.guards_context.dynamo_guards:
        match = re.fullmatch(r"L\['(\w+)'\](?:\['(\w+)'\])?", guard.name)
        if match is None:
            continue
        name = match.group(2) if match.group(1) == "kwargs" else (None if match.group(2) else match.group(1))
        if name is not None and name not in ("self", "kwargs") and name not in names:
            names.append(name)
    return sorted(names)


def _check_timestep_found(plan: CachePlan, options: Options, gm: fx.GraphModule) -> None:
    """A `timestep_arg` that names no input would merge every generation into one, so residuals would leak
    from one image into the next: an error, naming the inputs it could be. An argument Dynamo specialised
    into a constant (a Python float on its first call) is no input of this graph, but exists."""
    if options.timestep_arg is None or plan.timestep_name is not None:
        return
    arguments = _frame_arguments()
    if options.timestep_arg in arguments:
        return
    placeholders = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    state = set(model_state_positions(placeholders))
    inputs = [readable_input_name(name) for i, name in enumerate(placeholders) if i not in state]
    candidates = sorted(set(arguments) | {name for name in inputs if name.isidentifier()})
    raise ValueError(
        f"paracompile: option 'timestep_arg' is {options.timestep_arg!r}, but the compiled graph has no input of "
        f"that name; its inputs are {candidates}. Set 'timestep_arg' to the forward argument that carries the "
        "denoising timestep (First Block Cache starts a new generation when it rises), or to None and call "
        "paracompile.reset_cache() between generations")

