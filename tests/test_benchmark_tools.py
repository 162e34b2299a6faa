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
