"""The report behind `explain: True`: what ran sharded, where the graph was sliced and gathered, and why."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

logger = logging.getLogger("paracompile")


def describe_node(node: fx.Node) -> str:
    """`name (aten op) in module.path`: enough to find the node in the model's source."""
    target = getattr(node.target, "__name__", str(node.target))
    where = ""
    stack = node.meta.get("nn_module_stack")
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
    """Collected while the passes run; printed when `explain` is on."""

    world: str = ""
    attention: list[str] = field(default_factory=list)
    slices: list[str] = field(default_factory=list)
    gathers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"paracompile: {self.world}"]
        sections = [("attention", self.attention), ("sliced to token shards (no communication)", self.slices),
                    ("gathered to full tensors", self.gathers), ("notes", self.notes)]
        for title, items in sections:
            lines.append(f"  {title}: {len(items) if items else 'none'}")
            lines.extend(f"    - {item}" for item in items)
        return "\n".join(lines)

    def emit(self) -> None:
        """`explain=True` asks for the report, so it goes out at WARNING level: visible with logging not
        configured (Python's last-resort handler prints it to stderr) and under a typical application
        setup (the root logger at WARNING)."""
        logger.warning(self.format())
