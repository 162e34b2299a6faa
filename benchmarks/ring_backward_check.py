"""The differentiable ring attention op (paracompile/ring_kernels.py) on a CUDA device, against autograd
through SDPA on the full tensors: the CUDA kernels' forward and backward paths, which the CPU suite cannot run.

    python benchmarks/ring_backward_check.py --out benchmarks/results/ring_backward_check_1xH200.json

Ranks are threads on one GPU and the op's transfer is a hand-over between them (tests/test_ring_kernels.py's
harness); every case compares each rank's output and its query, key and value gradients with the same slices
of eager's, as the largest absolute error relative to the largest expected value, and names the backward
paths its blocks took (ring_kernels.backward_path: flash, efficient with the mask as bias, or fp32 math).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paracompile.ring_kernels as ring_kernels  # noqa: E402
from tests.test_ring_kernels import CASES, _ring_case  # noqa: E402

# case, kernel, dtype: flash only without a mask (it takes none); the others with and without.
CASES = dict(CASES, one_rank=([8], "own", None), one_rank_long=([300], "own", None))
RUNS = [("one_rank", "flash", torch.bfloat16), ("one_rank_long", "cudnn", torch.bfloat16),
        ("one_rank_long", "efficient", torch.float16), ("one_rank", "math", torch.float32),
        ("even", "flash", torch.bfloat16), ("even", "efficient", torch.bfloat16),
        ("uneven_masked", "efficient", torch.bfloat16), ("empty_block_masked", "efficient", torch.float32),
        ("causal_uneven", "efficient", torch.bfloat16), ("uneven_masked", "cudnn", torch.bfloat16),
        ("learned_bias", "math", torch.float32), ("queries_split_otherwise", "math", torch.float32),
        # the memory-efficient backward with the mask as its bias, and with the bias' gradient
        ("uneven_masked", "efficient", torch.float16), ("causal_uneven", "cudnn", torch.float16),
        ("learned_bias", "efficient", torch.bfloat16), ("learned_bias", "efficient", torch.float32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the harness (CPU kernels)")
    args = parser.parse_args()
    torch.set_default_device(args.device)
    runs = RUNS if args.device == "cuda" else [(n, "math" if k == "math" else "cpu_flash", d) for n, k, d in RUNS]
    rows = []
    for name, kernel, dtype in runs:
        patch = pytest.MonkeyPatch()
        row = dict(case=name, kernel=kernel, dtype=str(dtype).split(".")[-1])
        paths = []
        chosen = ring_kernels.backward_path
        patch.setattr(ring_kernels, "backward_path", lambda *a, **k: paths.append(chosen(*a, **k)) or paths[-1])
        try:
            results = _ring_case(*CASES[name], kernel, dtype, patch)
            for what in ("output", "query", "key", "value"):
                errors = [((r[what].float() - r[f"expected_{what}"].float()).abs().max()
                           / r[f"expected_{what}"].float().abs().max().clamp_min(1e-12)).item()
                          for r in results if r[what].numel()]
                row[what] = max(errors)
            if results[0].get("bias_sum") is not None:  # the ranks' partial bias gradients, summed
                expected = results[0]["expected_bias_sum"].float()
                row["bias"] = ((results[0]["bias_sum"].float() - expected).abs().max()
                               / expected.abs().max().clamp_min(1e-12)).item()
            row["padding_gradients_zero"] = all(
                torch.count_nonzero(r[p]).item() == 0 for r in results
                for p in ("query_padding", "key_padding", "value_padding"))
        except Exception as error:  # recorded, and the next case runs
            row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
        finally:
            patch.undo()
        row["backward_paths"] = sorted(set(paths))
        rows.append(row)
        print(row, flush=True)
    report = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command="python " + " ".join(sys.argv), runs=rows)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
