"""One backend call's state: what was asked (options), the mesh it runs on, and what it did (the report).

Invariant: everything one compile decides or reports lives on the CompileContext the backend made for that
call, and is reached through it: the explain texts in `records` (the rewrite's report, First Block
Cache's and compile_blocks' lines, in the order they were made), the rewritten graph in `rewritten_graph`.
The context is the `paracompile_context` attribute of the callable the backend returns. The backend also
feeds each text and graph, as it is made, to the bounded registry users read (`paracompile.explanations()`).
Two compiles never share a context, so a report can never mix two graphs. The package's other module
state belongs to no compile: the process groups of each world (mesh.py), the traced fragments, one per
signature (graph_builder.trace_fragment), and what calls keep (the input check's call counts,
runtime.py; First Block Cache's residuals, cache.py).

The backend's stages take the context instead of the options, the mesh plan and the report one by one;
so does First Block Cache, which compiles its parts through the backend's compile_graph. The rewriting
passes take only what they use (a group, a report, a callback) and never see the context.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.fx as fx

from paracompile.explain import Report
from paracompile.mesh import MeshPlan
from paracompile.options import Options

logger = logging.getLogger("paracompile")


def _ignore(_) -> None:
    return None


@dataclass
class CompileContext:
    options: Options
    # Refined as the pipeline learns the graph: "auto" resolved from its head counts, groups made
    # differentiable for a graph compiled to train.
    mesh: MeshPlan
    report: Report = field(default_factory=Report)
    records: list[str] = field(default_factory=list)
    rewritten_graph: Optional[fx.GraphModule] = None
    # Where the backend's registry takes each text and graph as it is made (so a compile that fails later
    # still leaves its report behind).
    on_record: Callable[[str], None] = _ignore
    on_rewritten: Callable[[fx.GraphModule], None] = _ignore

    def record(self, text: str) -> None:
        """Keeps an explain text of this compile; logged too when `explain` is on, at WARNING level: visible
        with logging not configured (Python's last-resort handler prints it to stderr) and under a typical
        application setup (the root logger at WARNING)."""
        self.records.append(text)
        self.on_record(text)
        if self.options.explain:
            logger.warning(text)

    def keep_rewritten(self, gm: fx.GraphModule) -> None:
        self.rewritten_graph = gm
        self.on_rewritten(gm)

    def with_options(self, options: Options) -> "CompileContext":
        """The same compile with other options (First Block Cache compiles its parts without the cache): its
        records and report are this context's."""
        return dataclasses.replace(self, options=options)


def with_context(compiled: Callable, context: CompileContext) -> Callable:
    """`compiled`, carrying `context` as its `paracompile_context` (a bound method cannot: it is wrapped, in
    the calling convention Dynamo reads from it, `_boxed_call`)."""
    try:
        compiled.paracompile_context = context
        return compiled
    except AttributeError:
        if getattr(compiled, "_boxed_call", False):
            def run(args):
                return compiled(args)

            run._boxed_call = True
        else:
            def run(*args):
                return compiled(*args)

        run.paracompile_context = context
        return run
