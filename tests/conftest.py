"""Helpers shared by the paracompile tests (imported as ``tests.conftest`` by the test modules).

Everything a spawned rank calls must be importable by name, so the helpers live at module level here.

How the checks work
-------------------
* Correctness: every rank's output is compared with single-process eager of the same model on the
  same inputs (computed in the rank before compiling; eager involves no communication), within
  ``TOLERANCE`` absolute, or relative to the largest absolute value of the expected output when
  that is above 1.
* The rewrite happened: ``paracompile.backend.rewritten_graphs`` holds the rewritten aten graph of
  every compile; Ulysses shows up there as ``_c10d_functional.all_to_all_single`` nodes.
* Attention really runs on 1/n of the work: ``AttentionRecorder`` is a ``TorchDispatchMode`` that
  records the shapes of the attention kernels (on CPU, ``aten._scaled_dot_product_flash_attention_for_cpu``
  or the math fallback). A plain dispatch mode makes Dynamo skip the frame and run the model eagerly,
  so the recorder sets ``ignore_compile_internals``: the mode is off while compiling and on while the
  compiled artifact runs. With ``compiler="eager"`` the artifact is the rewritten graph itself, so
  the recorder sees the local attention calls.
"""
from __future__ import annotations

import math
import os

# Inductor's CPU kernels compile without SIMD vectorization in the tests: their C++ compiles about a third
# faster (a tiny FLUX with compile_blocks: 29 s against 43 s cold), and what the tests check (the rewrite,
# its collectives, outputs against eager) does not depend on it. Set before torch is imported; spawned ranks
# inherit it. GPUs (Triton) are not affected.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
import traceback
from typing import Any, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

TOLERANCE = 1e-4

ALL_TO_ALL = "_c10d_functional.all_to_all_single"
ALL_GATHER = "_c10d_functional.all_gather_into_tensor"


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """Plan the world calls to start ahead (tests/multiprocess.py, RanksJob): those of each module with a
    selected slow test, in the order the modules run."""
    from tests.multiprocess import plan_run_ahead

    modules = []
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in modules and item.get_closest_marker("slow"):
            modules.append(module.__name__)
    plan_run_ahead(modules)


def pytest_runtest_setup(item):
    """Before each test, if no world is busy, the next planned world call starts in the background: while
    this test runs in the test process (one core), the ranks use the other."""
    from tests.multiprocess import run_ahead

    run_ahead()


@pytest.fixture(scope="module", autouse=True)
def _frozen_long_lived_objects():
    """The test process's long-lived objects leave the collector's walks before each module
    (tests/multiprocess.py's freeze_survivors says why; the rank processes do the same)."""
    from tests.multiprocess import freeze_survivors

    freeze_survivors()


# ----------------------------------------------------------------------------------------------
# Comparisons (run in the test process)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    return (actual.double() - expected.double()).abs().max().item()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """Within TOLERANCE absolute, or relative to max |expected| when that is larger than 1."""
    error = max_error(actual, expected)
    scale = max(1.0, expected.abs().max().item())
    assert math.isfinite(error) and error <= TOLERANCE * scale, (
        f"{what}: max abs error {error:.3e} exceeds {TOLERANCE:g} * {scale:.3g}"
    )


def assert_ranks_match(result: list[dict], what: str = "output") -> None:
    """`result` holds one dict per rank with "error", "expected" and "output"."""
    for rank, per_rank in enumerate(result):
        assert per_rank.get("error") is None, f"rank {rank} raised:\n{per_rank['error']}"
        assert_matches(per_rank["output"], per_rank["expected"], f"rank {rank} {what}")


def assert_attention_split(eager_calls: list, local_calls: list, world_size: int) -> None:
    """Each attention kernel call on a rank does about 1/world_size of the eager call's work.

    Work is heads x queries (every query still attends to all keys). Ulysses gives each rank
    heads / n heads over all (padded) queries; local cross-attention gives it all heads over a
    query shard. Padding adds at most n - 1 tokens per token segment; the bound allows 3 segments:
        local heads * local queries <= H * (S + 3 (n - 1)) / n
    Replicated attention (H * S) exceeds that for every S > 3.
    """
    assert eager_calls, "eager ran no attention kernel: nothing to compare"
    assert len(local_calls) == len(eager_calls), (
        f"{len(local_calls)} attention calls on this rank, {len(eager_calls)} in eager:\n"
        f"local {local_calls}\neager {eager_calls}"
    )
    for index, (eager, local) in enumerate(zip(eager_calls, local_calls)):
        heads, queries = eager["heads"] * eager["batch"], eager["queries"]
        bound = heads * (queries + 3 * (world_size - 1)) / world_size
        work = local["heads"] * local["batch"] * local["queries"]
        assert work <= bound, (
            f"attention call {index}: {local['heads']} heads x {local['queries']} queries on this rank "
            f"(eager: {eager['heads']} x {eager['queries']}) is more than 1/{world_size} of the work"
        )
        assert local["head_dim"] == eager["head_dim"], f"attention call {index}: head dim changed"


def report_sections(report: str) -> dict[str, list[str]]:
    """An explain report's (paracompile/explain.py) items by the first word of their section's heading:
    {"attention": [...], "sliced": [...], "gathered": [...], "reduced": [...], "notes": [...]}."""
    sections, current = {}, None
    for line in report.splitlines()[1:]:
        if line.startswith("    - "):
            sections[current].append(line[len("    - "):])
        else:
            current = line.strip().split(":")[0].split(" ")[0]
            sections[current] = []
    return sections


# ----------------------------------------------------------------------------------------------
# Recording (run in the ranks)


class AttentionRecorder(TorchDispatchMode):
    """Records the query/key shapes of every attention kernel that runs while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Off while Dynamo/the backend compile, on while the compiled artifact runs; without this,
        # Dynamo refuses to compile under a dispatch mode and silently runs the model eagerly.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
            query, key = args[0], args[1]
            self.calls.append(dict(
                op=name,
                batch=math.prod(query.shape[:-3]) if query.dim() > 3 else 1,
                heads=query.shape[-3],
                queries=query.shape[-2],
                keys=key.shape[-2],
                head_dim=query.shape[-1],
            ))
        return func(*args, **kwargs)


def count_nodes(gm: torch.fx.GraphModule, target_substring: str) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and target_substring in str(node.target))


def graph_summary(gm: Optional[torch.fx.GraphModule]) -> dict:
    if gm is None:
        return dict(all_to_all=0, all_gather=0)
    return dict(all_to_all=count_nodes(gm, ALL_TO_ALL), all_gather=count_nodes(gm, ALL_GATHER))


def compiled_call(compiled, call_inputs: dict, record: bool):
    """Calls `compiled(**call_inputs)`; returns (output, reports and rewritten graphs of the compiles
    this call triggered, attention kernel calls or None)."""
    import paracompile.backend as backend

    # Both are bounded deques that only the backend appends to: empty them so that whatever is in
    # them afterwards comes from this call.
    backend.explanations.clear()
    backend.rewritten_graphs.clear()
    recorder = AttentionRecorder() if record else None
    with torch.no_grad():
        if recorder is not None:
            with recorder:
                output = compiled(**call_inputs)
        else:
            output = compiled(**call_inputs)
    return output, list(backend.explanations), list(backend.rewritten_graphs), (recorder.calls if recorder else None)


def eager_call(model, call_inputs: dict, record: bool):
    recorder = AttentionRecorder() if record else None
    with torch.no_grad():
        if recorder is not None:
            with recorder:
                output = model(**call_inputs)
        else:
            output = model(**call_inputs)
    return output, (recorder.calls if recorder else None)


def run_compiled_vs_eager(model, call_inputs: dict, options: dict, output_of=lambda out: out, *,
                          record: bool = True, dynamic: Optional[bool] = None, compiled=None) -> dict:
    """Eager, then the paracompile-compiled model, on the same inputs; everything the tests look at.

    Returns a dict: expected, output, explanations (reports of the compiles this call triggered),
    graphs (graph summaries of those compiles), eager_calls / local_calls (attention kernel shapes),
    compiled (the compiled callable, to call again; dropped before returning from the rank),
    error (a traceback, or None).
    """
    result: dict[str, Any] = dict(error=None)
    try:
        expected, eager_calls = eager_call(model, call_inputs, record)
        if compiled is None:
            compiled = torch.compile(model, backend="paracompile", options=options, dynamic=dynamic)
        output, explanations, graphs, local_calls = compiled_call(compiled, call_inputs, record)
        result.update(
            expected=output_of(expected),
            output=output_of(output),
            explanations=explanations,
            graphs=[graph_summary(gm) for gm in graphs],
            eager_calls=eager_calls,
            local_calls=local_calls,
            compiled=compiled,
        )
    except Exception:
        result["error"] = traceback.format_exc()
    return result


def without_callables(result: dict) -> dict:
    return {key: value for key, value in result.items() if key != "compiled"}


@pytest.fixture(scope="module")
def fake_rank0():
    """This process as rank 0 of a fake 2-rank world (torch's fake process group: collectives keep their shapes
    and move no data), for plans and rewritten graphs in one process."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()
    torch._dynamo.reset()
