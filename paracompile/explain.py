"""The report behind `explain: True`: what ran sharded, where the graph was sliced and gathered, and why."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from paracompile.meta import NN_MODULE_STACK


def describe_node(node: fx.Node) -> str:
    """`name (aten op) in module.path`: enough to find the node in the model's source."""
    target = getattr(node.target, "__name__", str(node.target))
    where = ""
    stack = node.meta.get(NN_MODULE_STACK)
    if stack:
        path = list(stack.values())[-1][0]
        where = " in " + _readable_module_path(path)
    return f"{node.name} ({target}){where}"


def _readable_module_path(path: str) -> str:
    # Dynamo spells module paths like "L['self'].__dict__['_modules']['blocks'].0".
    for noise in ("L['self'].", "__dict__['_modules']", "._modules", "['", "']"):
        path = path.replace(noise, "." if noise in ("['",) else "")
    return path.replace("..", ".").strip(".") or "<root>"


@dataclass
class Report:
    """Collected while the passes run, one per compile (its CompileContext's); kept, and logged when
    `explain` is on, by CompileContext.record."""

    world: str = ""
    attention: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    gathers: list[str] = field(default_factory=list)
    reductions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"paracompile: {self.world}"]
        sections = [("attention", self.attention), ("sliced to token shards (no communication)", self.slices),
                    ("gathered to full tensors", self.gathers),
                    ("reduced over ranks (a partial sum, max or min each, all-reduced)", self.reductions), ("notes", self.notes)]
        for title, items in sections:
            lines.append(f"  {title}: {len(items) if items else 'none'}")
            lines.extend(f"    - {item}" for item in items)
        return "\n".join(lines)


def shape_text(node: fx.Node) -> str:
    """A node's (global or local) tensor shape as the reports print it, e.g. `(1, 4, 17, 16)`; `?` when it is
    no tensor."""
    import torch

    value = node.meta.get("val") if isinstance(node, fx.Node) else node
    if not isinstance(value, torch.Tensor):
        return "?"
    return str(tuple(int(s) if isinstance(s, int) else str(s) for s in value.shape))


def describe_added_ops(original: fx.Graph, rewritten: fx.Graph) -> str:
    """What the rewrite added around the model's own ops, by kind: the collectives, and the layout ops
    (slices, pads, copies, reshapes, concatenations) that move tokens between layouts. Each can be a kernel
    (or a launch) per step, so the count is worth keeping small."""
    from collections import Counter

    # The rules turn views, flattens and unflattens into `reshape` and `narrow` into `slice`: one family each.
    family = {"view": "reshape", "_unsafe_view": "reshape", "flatten": "reshape", "unflatten": "reshape",
              "narrow": "slice"}

    def counts(graph: fx.Graph) -> Counter:
        names = (getattr(node.target, "__name__", str(node.target)).split(".")[0]
                 for node in graph.nodes if node.op == "call_function")
        return Counter(family.get(name, name) for name in names)

    before, after = counts(original), counts(rewritten)
    added = {name: after[name] - before[name] for name in after if after[name] > before[name]}
    # Functional collectives, and paracompile's ops with a backward (differentiable.py, ring_kernels.py).
    collectives = {n: c for n, c in added.items() if n in ("all_to_all_single", "all_gather_into_tensor", "all_reduce",
                                                            "wait_tensor", "all_gather", "reduce_scatter",
                                                            "all_to_all", "ring_attention")}
    layout = {n: c for n, c in added.items() if n not in collectives}
    def listing(items):
        return ", ".join(f"{name} {count}" for name, count in sorted(items.items(), key=lambda i: (-i[1], i[0])))
    return (f"ops added by the rewrite: {sum(collectives.values())} collective ({listing(collectives) or 'none'}); "
            f"{sum(layout.values())} other ({listing(layout) or 'none'}); the original graph has "
            f"{sum(before.values())} ops")
