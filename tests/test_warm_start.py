"""Warm start: a new process group reuses the compiled graphs of an earlier one through Inductor's caches.

World 1 compiles the toy DiT on Ulysses 2 with Inductor into one cache directory, and each rank saves its
cache artifacts (`torch.compiler.save_cache_artifacts`). World 2 starts from another, empty cache directory,
loads its rank's artifacts (`torch.compiler.load_cache_artifacts`) and compiles the same model: Inductor
finds the rewritten graph in its cache (a hit, no miss), and the output still equals eager. This holds only
if the rewritten graph is the same in every process: no process-specific names or numbers in it.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import assert_matches
from tests.multiprocess import run_on_ranks
from tests.toy_dit import ToyDiT, toy_inputs

pytestmark = pytest.mark.slow  # two process groups, each compiling with Inductor


def _compile_and_run(rank, world_size, cache_dir, artifacts_dir, phase):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # a fresh process: read before its first compile
    from torch._dynamo.utils import counters

    path = os.path.join(artifacts_dir, f"rank{rank}.bin")
    if phase == "load":
        with open(path, "rb") as handle:
            torch.compiler.load_cache_artifacts(handle.read())
    torch.manual_seed(0)
    model, inputs = ToyDiT().eval(), toy_inputs()
    counters.clear()
    with torch.no_grad():
        expected = model(**inputs)
        output = torch.compile(model, backend="paracompile", options={
            "mesh": {"ulysses": 2}, "inductor": {"cpp.vec_isa_ok": False}})(**inputs)
    if phase == "save":
        artifacts = torch.compiler.save_cache_artifacts()
        assert artifacts is not None, "the first world recorded no cache artifacts"
        with open(path, "wb") as handle:
            handle.write(artifacts[0])
    return dict(output=output, expected=expected, hits=counters["inductor"]["fxgraph_cache_hit"],
                misses=counters["inductor"]["fxgraph_cache_miss"])


def test_a_new_world_loads_the_compiled_graphs_from_saved_artifacts(tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    first = run_on_ranks(_compile_and_run, 2, str(tmp_path / "cache_first"), str(artifacts), "save", timeout=600,
                         fresh=True)
    second = run_on_ranks(_compile_and_run, 2, str(tmp_path / "cache_second"), str(artifacts), "load", timeout=600,
                          fresh=True)
    for rank in range(2):
        assert first[rank]["misses"] >= 1 and first[rank]["hits"] == 0, first[rank]  # a cold cache
        assert second[rank]["hits"] >= 1 and second[rank]["misses"] == 0, second[rank]
        for result in (first[rank], second[rank]):
            assert_matches(result["output"], result["expected"], f"rank {rank}")
