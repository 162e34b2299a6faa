"""A training step (forward, mean squared error, backward) through paracompile: step time and peak memory
per rank against one process.

    python benchmarks/train_step.py --workload flux --blocks 4,8 --worlds 1 2 4 --out benchmarks/results/DIR
    python benchmarks/train_step.py --workload wan --blocks 6 --worlds 1 2 4
    python benchmarks/train_step.py --workload wan --blocks 6 --worlds 2 4 --mesh ring
    python benchmarks/train_step.py --tiny --worlds 1 2                # a dry run on a CPU

Each world size runs in a process of its own, one after another (this script launches them): world 1 is
`torch.compile` with Inductor on one GPU; world n > 1 is rank 0 of n in torch's fake process group
(`compare.init_fake_world`) with `options={"mesh": {"ulysses": n}}` (or `"ring"`: `--mesh`): this GPU does exactly rank 0's compute
and holds exactly rank 0's memory of an n-GPU run, but the collectives move no data (their outputs are
never written, so the numbers computed are garbage, and a step's time misses the communication). So on
one GPU this measures the memory arithmetic of context-parallel training (what one rank holds, how it falls
with n) and the compute per rank; not the step time an n-GPU machine would see. Workloads, weights and
inputs are benchmarks/compare.py's (bf16, random weights scaled by 0.5); the weights are trainable. Per world:
the first step's time (compile included), the median of `--steps` timed steps after `--warmup`, and the
peak memory allocated over the timed steps (`torch.cuda.max_memory_allocated`, reset before them). Writes
<out>/train_step_<workload tag>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args) -> dict:
    import torch

    from paracompile import paracompile_backend

    sys.path.insert(0, HERE)
    from compare import build_inputs, build_model, init_fake_world, versions, workload_spec

    world = args.worker_world
    cuda = not args.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        if args.no_cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = workload_spec(args.workload, args.tiny, args.blocks)
    model = build_model(spec, device, dtype).train()
    inputs = build_inputs(spec, device, dtype)
    options = {}
    if world > 1:
        init_fake_world(world)
        options = {"mesh": {args.mesh: world}}
    if args.tiny:
        options["compiler"] = "eager"
    if world > 1 or args.tiny:
        compiled = torch.compile(model, backend=paracompile_backend, options=options)
    else:
        compiled = model if args.world1 == "eager" else torch.compile(model)
    target = None

    def step():
        nonlocal target
        output = compiled(**inputs)[0]
        if target is None:
            target = torch.randn(output.shape, device=device, dtype=output.dtype,
                                 generator=torch.Generator(device=device).manual_seed(3))
        loss = (output.float() - target.float()).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()
    synchronize()
    first_step_s = time.perf_counter() - started
    for _ in range(args.warmup):
        step()
    synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        synchronize()
        started = time.perf_counter()
        step()
        synchronize()
        times.append(1000 * (time.perf_counter() - started))
    result = dict(world=world, runs=("eager model" if world == 1 and args.world1 == "eager" and not args.tiny else
                                     "torch.compile (Inductor)" if world == 1 and not args.tiny else
                                     f"paracompile {args.mesh} {world}, rank 0 of {world}" +
                                     (" (fake process group)" if world > 1 else "")),
                  first_step_s=round(first_step_s, 1), median_ms=round(statistics.median(times), 2),
                  times_ms=[round(t, 2) for t in times],
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
                  weights_gib=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30, 2),
                  tokens=spec["tokens"], description=spec["description"], tag=spec["tag"],
                  device=torch.cuda.get_device_name(device) if cuda else "cpu", **versions())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["flux", "wan"], default="flux")
    parser.add_argument("--blocks", default=None, help="compare.py's --blocks: FLUX 'double,single', Wan 'n'")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--world1", choices=["inductor", "eager"], default="inductor",
                        help="world 1 as torch.compile (Inductor) or the eager model")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="attention without cuDNN's kernels (flash or memory-efficient instead)")
    parser.add_argument("--mesh", choices=["ulysses", "ring"], default="ulysses",
                        help="the mesh dim the world n > 1 runs split over")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny configs, float32, eager compiler")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker-world", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_world is not None:
        with open(args.worker_out, "w") as handle:
            json.dump(worker(args), handle)
        return

    results = []
    for world in args.worlds:
        out = os.path.join(args.out, f".train_step_world{world}.json")
        os.makedirs(args.out, exist_ok=True)
        command = [sys.executable, os.path.abspath(__file__), "--worker-world", str(world), "--worker-out", out,
                   "--workload", args.workload, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--world1", args.world1, "--mesh", args.mesh] + (["--no-cudnn-attention"] if args.no_cudnn_attention else [])
        command += (["--blocks", args.blocks] if args.blocks else []) + (["--tiny"] if args.tiny else [])
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            results.append(dict(world=world, error=finished.stderr[-3000:]))
            print(f"world {world}: failed\n{finished.stderr[-3000:]}", flush=True)
            continue
        with open(out) as handle:
            results.append(json.load(handle))
        os.remove(out)
        print(f"world {world}: {results[-1]['median_ms']} ms per step, peak {results[-1]['peak_gib']} GiB", flush=True)
    done = [r for r in results if "error" not in r]
    report = dict(workload=args.workload, mesh=args.mesh, date=time.strftime("%Y-%m-%d"),
                  command="python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
                  results=results, **({k: done[0][k] for k in ("device", "torch", "tag", "description")} if done else {}))
    tag = done[0]["tag"] if done else args.workload
    path = os.path.join(args.out, f"train_step_{tag}" + ("" if args.mesh == "ulysses" else f"_{args.mesh}"))
    with open(path + ".json", "w") as handle:
        json.dump(report, handle, indent=2)
    with open(path + ".md", "w") as handle:
        handle.write(markdown(report) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# Training step per rank: {report.get('description', report['workload'])}", "",
             f"- device: {report.get('device')}, torch {report.get('torch')}, {report['date']}",
             f"- command: `{report['command']}`",
             "- world 1: one GPU (the eager model or `torch.compile`, as the table says); world n: rank 0 of n in "
             f"torch's fake process group, `mesh={{'{report.get('mesh', 'ulysses')}': n}}`: rank 0's compute and memory, collectives that move "
             "no data (no communication time, garbage values). Peak memory includes the weights and their "
             "gradients (2x the weights column), which every rank holds in full", "",
             "| world | what runs | first step s | median step ms | peak allocated GiB | weights GiB |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['world']} | failed: {r['error'].strip().splitlines()[-1][:150]} | | | | |")
        else:
            lines.append(f"| {r['world']} | {r['runs']} | {r['first_step_s']} | {r['median_ms']} | {r['peak_gib']} | "
                         f"{r['weights_gib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
