"""Where a GPU sits idle in a profiled step: reads a torch.profiler Chrome trace and sorts every idle gap
between kernels (all streams together) by what ended it.

    python benchmarks/gaps.py trace.json[.gz] --steps 3

- host: the kernel after the gap was launched after the gap began: the GPU waited for the host (Python,
  launch overhead, a host-side synchronisation);
- dependency: it was launched before the gap began but started late: it waited for another stream (a
  collective's wait, an event) or a graph's internal ordering.
Gaps shorter than 2 us (back-to-back kernels) are not counted as gaps.

It also reports how much of the NCCL kernels' time ran while a compute kernel ran too (on another stream):
the communication that overlap hides; the rest is exposed or waiting for the other rank.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def summarize(events: list[dict], steps: int, top: int = 12) -> dict:
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    if not kernels:
        return {"kernels": 0}
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy_end = kernels[0]["ts"]
    busy = 0.0
    gaps = []
    previous = None
    for kernel in kernels:
        start, end = kernel["ts"], kernel["ts"] + kernel["dur"]
        if start > busy_end + 2.0 and previous is not None:
            launch = launches.get(kernel.get("args", {}).get("correlation"))
            launched_at = launch["ts"] + launch["dur"] if launch else None
            kind = "host" if launched_at is not None and launched_at > busy_end else "dependency"
            gaps.append(dict(us=start - busy_end, kind=kind, before=previous["name"][:70], after=kernel["name"][:70],
                             launch=launch["name"] if launch else None))
        if end > busy_end:
            busy += end - max(start, busy_end)
            busy_end = end
            previous = kernel
    by_kind = collections.Counter()
    count = collections.Counter()
    for gap in gaps:
        by_kind[gap["kind"]] += gap["us"]
        count[gap["kind"]] += 1
    pairs = collections.Counter()
    for gap in gaps:
        pairs[(gap["kind"], gap["before"], gap["after"])] += gap["us"]
    nccl_us, overlapped_us = nccl_overlap(kernels)
    return dict(
        nccl_ms_per_step=round(nccl_us / 1000 / steps, 3),
        nccl_overlapped_with_compute_ms_per_step=round(overlapped_us / 1000 / steps, 3),
        span_ms_per_step=round(span / 1000 / steps, 3), busy_ms_per_step=round(busy / 1000 / steps, 3),
        idle_ms_per_step={kind: round(us / 1000 / steps, 3) for kind, us in by_kind.items()},
        gaps_per_step={kind: round(n / steps, 1) for kind, n in count.items()},
        largest_sources=[dict(kind=k, before=b, after=a, ms_per_step=round(us / 1000 / steps, 3))
                         for (k, b, a), us in pairs.most_common(top)])


def nccl_overlap(kernels: list[dict]) -> tuple[float, float]:
    """(NCCL kernel time, the part of it during which some other kernel ran), in us."""
    def is_nccl(kernel):
        return "nccl" in kernel["name"].lower()

    compute: list[list[float]] = []  # the union of the other kernels' intervals, in order
    for kernel in kernels:
        if is_nccl(kernel):
            continue
        start, end = kernel["ts"], kernel["ts"] + kernel["dur"]
        if compute and start <= compute[-1][1]:
            compute[-1][1] = max(compute[-1][1], end)
        else:
            compute.append([start, end])
    starts = [interval[0] for interval in compute]
    total = overlapped = 0.0
    for kernel in kernels:
        if not is_nccl(kernel):
            continue
        start, end = kernel["ts"], kernel["ts"] + kernel["dur"]
        total += end - start
        first = max(0, bisect.bisect_right(starts, start) - 1)
        for low, high in compute[first:bisect.bisect_right(starts, end)]:
            overlapped += max(0.0, min(end, high) - max(start, low))
    return total, overlapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(summarize(load(args.trace), args.steps), indent=1))


if __name__ == "__main__":
    main()
