"""The block loop of a DiT graph: the ModuleList(s) whose children run attention, found from the nodes'
module stacks (`nn_module_stack`), with no per-model list.

Invariant: `find_block_region` returns the blocks in execution order with each block's first and last
position in the node list, or raises CacheUnavailable saying why the graph has no loop it can use. It
reads only the graph's structure (module stacks, attention kernels, positions), which is the same on every
rank. First Block Cache skips the blocks after the first; compile_blocks compiles each distinct block once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

from paracompile.meta import NN_MODULE_STACK
from paracompile.passes.sharding_rules import is_attention_kernel


class CacheUnavailable(Exception):
    """The graph has no block loop this pass can cache; the message says why."""


_PATH_TOKEN = re.compile(r"\['([^']*)'\]|\[(\d+)\]|([A-Za-z_][A-Za-z_0-9]*|\d+)")
_PATH_NOISE = {"__dict__", "_modules"}


def module_path(dynamo_path: str) -> tuple[str, ...]:
    """`L['self'].__dict__['_modules']['blocks'].0` (or `L['self'].blocks[0]`) -> ('blocks', '0')."""
    parts = [quoted or indexed or plain for quoted, indexed, plain in _PATH_TOKEN.findall(dynamo_path)]
    if parts[:2] == ["L", "self"]:
        parts = parts[2:]
    return tuple(part for part in parts if part not in _PATH_NOISE)


def block_of(node: fx.Node) -> Optional[tuple[tuple[str, ...], int]]:
    """(list path, child index) of the outermost list child this node runs in, or None."""
    stack = node.meta.get(NN_MODULE_STACK)
    if not stack:
        return None
    for path, _ in stack.values():
        parts = module_path(path)
        if parts and parts[-1].isdigit():
            return parts[:-1], int(parts[-1])
    return None


def dotted(parts: tuple[str, ...]) -> str:
    return ".".join(parts) or "<root>"


@dataclass
class BlockRegion:
    lists: list[tuple[str, ...]]  # in execution order
    blocks: list[tuple[tuple[str, ...], int]]  # every block of the region, block 0 first
    positions: dict  # block -> (first position, last position)

    @property
    def first_block(self):
        return self.blocks[0]

    def describe_lists(self) -> str:
        counts = {path: sum(1 for list_path, _ in self.blocks if list_path == path) for path in self.lists}
        return ", ".join(f"{dotted(path)} ({count} block{'s' if count != 1 else ''})" for path, count in counts.items())


def find_block_region(nodes: list[fx.Node], whole_loop: bool = True) -> BlockRegion:
    """The outermost ModuleList(s) whose children hold attention and run one after another. `whole_loop`:
    the graph must run every child from 0 (the cache skips them all); without it, any run of children
    will do (a part of First Block Cache's split holds children 1..n)."""
    positions: dict = {}
    for position, node in enumerate(nodes):
        block = block_of(node) if node.op == "call_function" else None
        if block is not None:
            first, _ = positions.get(block, (position, position))
            positions[block] = (first, position)
    # By position, not by module stack: nodes the sharding passes create (ring attention's kernels, a
    # replicated fallback) have no stack, but run between their block's first and last node.
    attention = [position for position, node in enumerate(nodes) if is_attention_kernel(node.target)]
    with_attention = {block[0] for block, (first, last) in positions.items()
                      if any(first <= position <= last for position in attention)}
    if not with_attention:
        raise CacheUnavailable("no ModuleList in the graph has children that run attention (no block loop)")
    depth = min(len(path) for path in with_attention)
    lists = sorted((path for path in with_attention if len(path) == depth),
                   key=lambda path: min(positions[b][0] for b in positions if b[0] == path))
    blocks = []
    for path in lists:
        indices = sorted(index for list_path, index in positions if list_path == path)
        if whole_loop and indices != list(range(len(indices))):
            raise CacheUnavailable(
                f"{dotted(path)} runs children {indices} in this graph, not 0..n-1: the graph holds only part of "
                "the block loop (a graph break inside it?)")
        blocks += [(path, index) for index in indices]
    for previous, block in zip(blocks, blocks[1:]):
        if positions[previous][1] >= positions[block][0]:
            raise CacheUnavailable(
                f"blocks {dotted(previous[0])}.{previous[1]} and {dotted(block[0])}.{block[1]} interleave: "
                "the block loop's children do not run one after another")
    if len(blocks) < 2:
        raise CacheUnavailable(f"the block loop {dotted(lists[0])} has a single block: nothing to skip")
    return BlockRegion(lists, blocks, positions)
