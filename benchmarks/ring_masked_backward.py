"""Peak memory and time of ring attention's backward for one masked block on a CUDA device: the
memory-efficient kernel with the mask as its bias (ring_kernels.backward_path "efficient") against the fp32
math path it replaced. One rank, so the ring is one step and the numbers are one block's.

    python benchmarks/ring_masked_backward.py --out benchmarks/results/ring_masked_backward_1xH200.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paracompile.ring_kernels as ring_kernels  # noqa: E402
from tests.test_ring_kernels import ThreadRing  # noqa: E402

OP = torch.ops.paracompile.ring_attention


def measure(path: str, batch: int, heads: int, tokens: int, head_dim: int, repeats: int) -> dict:
    chosen = ring_kernels.backward_path
    if path == "math":
        ring_kernels.backward_path = lambda *args, **kwargs: "math"
    try:
        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        allowed = torch.rand(batch, 1, 1, tokens, device="cuda") > 0.1  # a key padding mask
        allowed[..., 0] = True
        mask = torch.zeros(allowed.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~allowed, float("-inf"))
        grad = torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16)
        times, peaks = [], []
        for _ in range(repeats + 1):
            out, _ = OP(q, k, v, [mask], None, [], [tokens], None, "efficient", 0, 1, "ring")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            out.backward(grad)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30)
            q.grad = k.grad = v.grad = None
        return dict(path=path, backward_ms=round(statistics.median(times[1:]), 2),
                    backward_ms_spread=[round(min(times[1:]), 2), round(max(times[1:]), 2)],
                    backward_peak_gib_above_inputs=round(max(peaks[1:]), 3))
    finally:
        ring_kernels.backward_path = chosen


def main() -> None:
    ring = ThreadRing(1)  # one rank: its block's accumulators come home without a process group
    ring_kernels._shift, ring_kernels._finish = ring.shift, ring.finish
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for path in ("efficient", "math", "efficient", "math"):  # interleaved
        rows.append(measure(path, args.batch, args.heads, args.tokens, args.head_dim, args.repeats))
        print(rows[-1], flush=True)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command="python " + " ".join(sys.argv), shape=dict(batch=args.batch, heads=args.heads,
                  tokens=args.tokens, head_dim=args.head_dim, dtype="bfloat16", mask="key padding"), runs=rows)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
