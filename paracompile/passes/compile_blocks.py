"""Compile each distinct block of a DiT's block loop once, and run its siblings through the same code.

Invariant: the callable `compile_by_block` returns computes exactly what the graph computes: every node
runs once, in graph order, inside one of the graph's consecutive parts; a part runs the compiled code of
another part only when the two graphs are the same node for node (same ops, same arguments, same input
shapes, strides and dtypes, equal constants), so only the tensors they are called with differ (each
block's own weights and activations). Collectives stay inside the part that issues them, visible to the
compiler that schedules them.

How the graph is cut (by position, which is execution order; the block loop is First Block Cache's,
`find_block_region`): each block of the loop is one part (from its first node to its last, with whatever
the rewrite emitted in between), and the nodes before, between and after the blocks form glue parts. A
part's inputs are the values it reads from earlier parts or the graph's inputs, its outputs the values
later parts or the graph's output read. Parts are compared by a structural key; the first part of each
key is compiled, the others call its compiled code with their own inputs.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from paracompile.passes.block_loop import CacheUnavailable, dotted, find_block_region


class BlocksUnavailable(Exception):
    """The graph has no repeated blocks to compile once; the message says why."""


@dataclass
class Part:
    name: str
    graph_module: fx.GraphModule
    inputs: list[fx.Node]  # nodes of the original graph this part reads, in its placeholders' order
    outputs: list[fx.Node]  # nodes of the original graph it produces for later parts or the output
    key: str = ""
    example_inputs: list = field(default_factory=list)


@dataclass
class BlockSplit:
    parts: list[Part]
    placeholders: list[fx.Node]
    output: Any  # the original output node's argument, over original nodes
    blocks: list[str]  # the parts that are blocks of the loop, by name
    constants: dict = field(default_factory=dict)  # get_attr node -> its value, for the output

    def distinct(self) -> dict[str, list[Part]]:
        """Parts by structural key, in order of first appearance."""
        groups: dict[str, list[Part]] = {}
        for part in self.parts:
            groups.setdefault(part.key, []).append(part)
        return groups

    def describe(self) -> str:
        groups = self.distinct()
        shared = [group for group in groups.values() if len(group) > 1]
        text = ", ".join(f"{group[0].name} .. {group[-1].name} ({len(group)}) share one" for group in shared)
        return (f"compile once per block: {len(self.parts)} parts ({len(self.blocks)} blocks), {len(groups)} "
                f"compiled" + (f"; {text}" if text else "; no two blocks alike"))


def split_by_block(gm: fx.GraphModule) -> BlockSplit:
    nodes = list(gm.graph.nodes)
    try:
        region = find_block_region(nodes, whole_loop=False)
    except CacheUnavailable as error:
        raise BlocksUnavailable(str(error)) from None
    ranges = sorted(((first, last, f"{dotted(block[0])}.{block[1]}")
                     for block, (first, last) in region.positions.items() if block in set(region.blocks)))
    # Part index of every position: blocks are their ranges, glue fills the gaps.
    bounds: list[tuple[int, int, str, bool]] = []
    cursor = 0
    for first, last, name in ranges:
        if first > cursor:
            bounds.append((cursor, first - 1, f"glue {len(bounds)}", False))
        bounds.append((first, last, name, True))
        cursor = last + 1
    if cursor < len(nodes):
        bounds.append((cursor, len(nodes) - 1, f"glue {len(bounds)}", False))

    placeholders = [node for node in nodes if node.op == "placeholder"]
    output_node = nodes[-1]
    part_of: dict[fx.Node, int] = {}
    for index, (first, last, _, _) in enumerate(bounds):
        for node in nodes[first:last + 1]:
            if node.op not in ("placeholder", "output", "get_attr"):
                # An element of a tuple stays with the op that made the tuple: parts pass tensors, not tuples.
                producer = node.args[0] if node.target is operator.getitem else None
                part_of[node] = part_of.get(producer, index) if isinstance(producer, fx.Node) else index
    members: list[list[fx.Node]] = [[] for _ in bounds]
    for node in nodes:
        if node in part_of:
            members[part_of[node]].append(node)

    later_readers: dict[fx.Node, set] = {}
    for node in nodes:
        reader = part_of.get(node, len(bounds)) if node is not output_node else len(bounds)
        for argument in node.all_input_nodes:
            later_readers.setdefault(argument, set()).add(reader)

    parts = []
    for index, (_, _, name, _) in enumerate(bounds):
        chosen = members[index]
        if not chosen:
            continue
        inputs: list[fx.Node] = []
        for node in chosen:
            for argument in node.all_input_nodes:
                if argument.op != "get_attr" and part_of.get(argument) != index and argument not in inputs:
                    inputs.append(argument)
        outputs = [node for node in chosen if any(reader != index for reader in later_readers.get(node, ()))]
        inputs += _symbol_sources(chosen, inputs, placeholders, name)
        parts.append(_build_part(gm, name, chosen, inputs, outputs))
    if len(parts) < 2:
        raise BlocksUnavailable("the graph is one part")
    constants = {node: _fetch_attr(gm, node.target) for node in output_node.all_input_nodes if node.op == "get_attr"}
    return BlockSplit(parts, placeholders, output_node.args[0],
                      [name for _, _, name, is_block in bounds if is_block], constants)


def _free_symbols(value: Any) -> set:
    if isinstance(value, torch.SymInt):
        return set(value.node.expr.free_symbols)
    if isinstance(value, torch.Tensor):
        return set().union(*(_free_symbols(size) for size in (*value.shape, *value.stride())))
    if isinstance(value, (list, tuple)):
        return set().union(*(_free_symbols(item) for item in value))
    return set()


def _bound_symbols(value: Any) -> set:
    """The symbols a compiler can read off this input: the sizes and strides of a tensor that are a symbol
    alone. Not a SymInt input: compile_fx gives that a fresh symbol (s0 comes in as s7), so a part whose
    only source of s0 is a SymInt fails as if it had none."""
    sizes = [*value.shape, *value.stride()] if isinstance(value, torch.Tensor) else []
    return {size.node.expr for size in sizes if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol}


def _symbol_sources(chosen: list[fx.Node], inputs: list[fx.Node], placeholders: list[fx.Node], name: str) -> list:
    """Graph inputs to pass to a part as well, so that every symbol its shapes use can be read off its inputs:
    a block whose inputs are token shards of (s0 + 1) // 2 tokens still needs s0 itself (Inductor cannot
    invert the expression, and fails with "expected [s0] to have been codegen-ed")."""
    needed = set().union(*(_free_symbols(node.meta.get("val")) for node in [*chosen, *inputs]))
    bound = set().union(*(_bound_symbols(node.meta.get("val")) for node in inputs))
    extra = []
    for symbol in sorted(needed - bound, key=str):
        source = next((p for p in placeholders if symbol in _bound_symbols(p.meta.get("val"))), None)
        if source is None:
            raise BlocksUnavailable(f"{name} uses the size {symbol}, which no graph input carries")
        if source not in inputs and source not in extra:
            extra.append(source)
        bound |= _bound_symbols(source.meta.get("val"))
    return extra


def _build_part(gm: fx.GraphModule, name: str, chosen: list[fx.Node], inputs: list[fx.Node],
                outputs: list[fx.Node]) -> Part:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for position, node in enumerate(inputs):
        placeholder = graph.placeholder(f"input_{position}")
        placeholder.meta.update(node.meta)
        env[node] = placeholder

    def value(node: fx.Node) -> fx.Node:
        if node not in env:  # a get_attr: copied into every part that reads it
            env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    for node in chosen:
        for argument in node.all_input_nodes:
            value(argument)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[node] for node in outputs))
    graph.lint()
    part = Part(name, fx.GraphModule(gm, graph), inputs, outputs)
    part.key = structural_key(part.graph_module)
    part.example_inputs = [node.meta.get("val") for node in inputs]
    return part


def structural_key(gm: fx.GraphModule) -> str:
    """Equal for two graphs that compute the same function of their inputs: the same ops in the same order
    with the same arguments (nodes by position), inputs of the same shape, stride, dtype and device, and
    constants with equal values."""
    index: dict[fx.Node, int] = {}
    lines = []

    def argument(value: Any) -> str:
        if isinstance(value, fx.Node):
            return f"%{index[value]}"
        if isinstance(value, (list, tuple)):
            inner = ", ".join(argument(v) for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {argument(v)}" for k, v in value.items()) + "}"
        return repr(value)

    storages: dict = {}  # inputs that share storage are aliases: which ones is part of the function
    for position, node in enumerate(gm.graph.nodes):
        index[node] = position
        if node.op == "placeholder":
            value = node.meta.get("val")
            alias = ""
            if isinstance(value, torch.Tensor):
                try:
                    storage = value.untyped_storage()
                    alias = f" alias {storages.setdefault(id(storage), position)} offset {value.storage_offset()}"
                except (NotImplementedError, RuntimeError):  # a tensor without storage (some subclasses)
                    alias = f" no storage {id(value)}"
            lines.append(f"input {_describe_value(value)}{alias}")
        elif node.op == "get_attr":
            lines.append(f"constant {_describe_constant(_fetch_attr(gm, node.target))}")
        elif node.op == "call_module":
            lines.append(f"module {id(_fetch_attr(gm, node.target))}")  # never equal to another part's
        else:
            target = node.target
            # The target object itself (ops and functions are the same objects in every part that calls
            # them; two closures with one name are not), its name for whoever reads the key.
            name = target if isinstance(target, str) else f"{getattr(target, '__qualname__', target)} #{id(target)}"
            lines.append(f"{node.op} {name}({argument(node.args)}, {argument(node.kwargs)})")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _fetch_attr(gm: fx.GraphModule, target: str):
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        kind = type(value).__qualname__  # a quantized weight's subclass reports its logical dtype
        if hasattr(value, "__tensor_flatten__"):
            kind += f" {value.__tensor_flatten__()[1]!r}"
        return (f"{kind} {tuple(map(str, value.shape))} {tuple(map(str, value.stride()))} {value.dtype} "
                f"{value.device}")
    if isinstance(value, torch.SymInt):
        return f"symint {value.node.expr}"
    return f"{type(value).__name__} {value!r}"


def _describe_constant(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return f"{_describe_value(value)} {digest}"
    return f"{type(value).__name__} {id(value)}"


class RunByBlock:
    """Runs the parts in order; parts with one key share the compiled code of the first."""

    def __init__(self, split: BlockSplit, compiled: dict[str, Callable]):
        self.placeholders = split.placeholders
        self.output = split.output
        self.constants = split.constants
        # A value is dropped after the last part that reads it (not the output's): holding every block's
        # streams until the call returns would grow peak memory with the number of blocks.
        kept: set = set()
        fx.node.map_arg(split.output, lambda node: kept.add(node) or node)
        last_reader: dict[fx.Node, int] = {}
        for step, part in enumerate(split.parts):
            for node in part.inputs:
                last_reader[node] = step
        self.steps = []
        for step, part in enumerate(split.parts):
            done = [node for node in part.inputs if last_reader[node] == step and node not in kept]
            self.steps.append((compiled[part.key], part.inputs, part.outputs, done))

    def __call__(self, *args):
        env: dict[fx.Node, Any] = dict(self.constants)
        env.update(zip(self.placeholders, args))
        for run, inputs, outputs, done in self.steps:
            results = run(*[env[node] for node in inputs])
            for node in done:
                del env[node]
            env.update(zip(outputs, results))
        return fx.map_arg(self.output, env.__getitem__)


def compile_by_block(gm: fx.GraphModule, compile_part: Callable[[fx.GraphModule, list, str], Callable],
                     record: Optional[Callable[[str], None]] = None) -> Optional[Callable]:
    """The graph compiled once per distinct part (see the module docstring), or None when it has no
    repeated blocks (the caller compiles it whole). `compile_part(graph_module, example_inputs, name)`
    compiles one part; `record` receives the explain line."""
    try:
        split = split_by_block(gm)
    except Exception as error:  # BlocksUnavailable, or a graph this pass does not handle: compile it whole
        reason = str(error) if isinstance(error, BlocksUnavailable) else f"{type(error).__name__}: {error}"
        if record is not None:
            record(f"compile once per block: off ({reason}); the graph is compiled whole")
        return None
    compiled = {key: compile_part(group[0].graph_module, group[0].example_inputs, group[0].name)
                for key, group in split.distinct().items()}
    if record is not None:
        record(split.describe())
    return RunByBlock(split, compiled)
