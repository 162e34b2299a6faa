"""First-call (compile) time of one model, compiled whole against `compile_blocks=True`, each in a fresh
process with an empty Inductor cache directory.

    python benchmarks/compile_time.py --workload flux --tiny --blocks 8,16 --out benchmarks/results

Each variant runs in its own process (a child of this one) so that no in-memory cache carries over, with
`TORCHINDUCTOR_CACHE_DIR` set to a new empty directory; the child builds the workload's model and inputs
(benchmarks/compare.py), compiles it with paracompile on one process (`mesh` of one rank: plain Inductor,
or Inductor per block), and reports the first call's wall time, the second call's, and the output's largest
difference from eager. `--tiny` runs the CPU configs in float32; without it, the full-size model in bf16 on
the GPU. Results: --out/compile_time_<tag>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args) -> None:
    import torch

    sys.path.insert(0, HERE)
    from compare import build_inputs, build_model, workload_spec

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = workload_spec(args.workload, args.tiny, args.blocks)
    model = build_model(spec, device, dtype)
    inputs = build_inputs(spec, device, dtype)
    from paracompile import paracompile_backend

    options = {"compile_blocks": args.variant == "blocks"}
    compiled = torch.compile(model, backend=lambda gm, example: paracompile_backend(gm, example, options=options))
    with torch.no_grad():
        reference = model(**inputs)[0]
        times = []
        for _ in range(2):
            start = time.perf_counter()
            output = compiled(**inputs)[0]
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps(dict(variant=args.variant, first_call_s=round(times[0], 2),
                                      second_call_s=round(times[1], 4),
                                      max_abs_diff_vs_eager=float((output.float() - reference.float()).abs().max()),
                                      description=spec["description"], tag=spec["tag"],
                                      torch=torch.__version__, device=str(device))), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="flux", choices=["flux", "wan"])
    parser.add_argument("--blocks", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default="whole,blocks")
    parser.add_argument("--out", default=".")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    results = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as cache:
            command = [sys.executable, os.path.abspath(__file__), "--workload", args.workload, "--variant", variant]
            command += (["--tiny"] if args.tiny else []) + (["--blocks", args.blocks] if args.blocks else [])
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            finished = subprocess.run(command, env=env, capture_output=True, text=True)
            line = next((l for l in finished.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(results[-1], flush=True)
    meta = dict(date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv),
                workload=results[0]["description"], torch=results[0]["torch"], device=results[0]["device"],
                cpus=os.cpu_count())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compile_time_{results[0]['tag']}")
    with open(stem + ".json", "w") as handle:
        json.dump(dict(meta=meta, results=results), handle, indent=1)
    lines = [f"# First call: whole graph against compile once per block ({meta['device']})", "",
             f"{meta['workload']}; torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}; one process, each "
             "variant in a fresh process with an empty Inductor cache directory.", "", f"`{meta['command']}`", "",
             "| variant | first call s | second call s | max abs diff vs eager |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['first_call_s']} | {r['second_call_s']} | {r['max_abs_diff_vs_eager']:.2e} |"
              for r in results]
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
