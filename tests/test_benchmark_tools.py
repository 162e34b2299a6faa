"""The benchmark tools' own arithmetic, in one process: how much NCCL time a trace shows overlapped with
compute (benchmarks/gaps.py), and the harness's stall watchdog (benchmarks/rounds.py)."""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gaps  # noqa: E402
import rounds  # noqa: E402


def _kernel(name, start, duration):
    return dict(ph="X", cat="kernel", name=name, ts=float(start), dur=float(duration), args={})


def test_nccl_time_overlapped_with_compute_counts_only_the_shared_intervals():
    kernels = sorted([
        _kernel("nvjet_matmul", 0, 10),
        _kernel("ncclDevKernel_SendRecv", 5, 10),     # 5 of its 10 us beside the matmul
        _kernel("triton_poi_fused_add", 20, 4),
        _kernel("triton_poi_fused_mul", 22, 6),       # overlaps the add: the union is 20-28
        _kernel("ncclDevKernel_SendRecv", 18, 12),    # 8 of its 12 us beside 20-28
        _kernel("ncclDevKernel_AllGather", 40, 5),    # alone
    ], key=lambda kernel: kernel["ts"])
    assert gaps.nccl_overlap(kernels) == (27.0, 13.0)
    summary = gaps.summarize(kernels, steps=1)
    assert summary["nccl_ms_per_step"] == 0.027 and summary["nccl_overlapped_with_compute_ms_per_step"] == 0.013


def test_stall_watchdog_prints_the_stacks_once_no_call_began_for_its_time(capsys):
    watchdog = rounds.StallWatchdog(rank=3, seconds=0.2)
    try:
        for _ in range(4):
            watchdog.mark("pc_ulysses")
            time.sleep(0.05)
        assert "no progress" not in capsys.readouterr().out
        time.sleep(0.5)
    finally:
        watchdog.stop()
    printed = capsys.readouterr().out
    assert "rank 3: no progress for" in printed and "last: pc_ulysses" in printed
    assert "thread MainThread:" in printed and "test_stall_watchdog" in printed


def test_compile_time_warm_table_and_cache_contents(tmp_path):
    import argparse
    import json

    import compile_time

    cache = tmp_path / "cache"
    (cache / "triton" / "0").mkdir(parents=True)
    (cache / "fxgraph.bin").write_bytes(b"x" * 2048)
    (cache / "triton" / "0" / "kernel.cubin").write_bytes(b"y" * 1024)
    contents = compile_time.cache_contents(str(cache))
    assert (contents["files"], contents["triton_files"]) == (2, 1)

    caches = dict(inductor_hit=0, inductor_miss=3, inductor_bypass=0)
    result = dict(variant="blocks", first_call_s=40.0, step_ms=75.0, tag="flux", description="FLUX", torch="t",
                  device="d", process_s=60.0, dynamo_graphs=dict(after_first_call=1, after_steps=1), caches=caches,
                  cache_after_cold=contents, warm_first_call_s=9.5, warm_step_ms=74.0, warm_process_s=25.0,
                  warm_dynamo_graphs=dict(after_first_call=1, after_steps=1),
                  warm_caches=dict(inductor_hit=3, inductor_miss=0, inductor_bypass=0))
    args = argparse.Namespace(out=str(tmp_path), fake_world=2, warm=True, steps=5)
    compile_time.write_results(args, [result])
    assert json.loads((tmp_path / "compile_time_flux_fake2_warm.json").read_text())["results"][0]["warm_first_call_s"] == 9.5
    table = (tmp_path / "compile_time_flux_fake2_warm.md").read_text()
    assert "| blocks | 40.0 | 9.5 | 75.0 / 74.0 | - | 2, 0.0 (1, 0.0) | 0/3/0 / 3/0/0 | 1, 1 / 1, 1 | 60.0 / 25.0 |" in table
