"""First Block Cache: quality against speed on the digits model (examples/digits_model.py).

    python benchmarks/fbcache_sweep.py                                  # one process
    torchrun --nproc_per_node=2 benchmarks/fbcache_sweep.py             # Ulysses over 2 processes

For each threshold (0 is the cache off, the reference), the transformer is compiled with paracompile
(`options={"mesh": {"ulysses": world_size}, "threshold": t}`), then the same grid of digits is sampled
`--repeats` times from the same noise, `paracompile.reset_cache()` before each run; the runs of all thresholds
are interleaved, so that a busy machine slows them alike. Per threshold: the hit ratio (transformer calls that
skipped the blocks after the first), the speedup (median time of a sampling run at threshold 0 over that at t)
and the error against the threshold-0 samples (max and mean |difference|,
pixels in [-1, 1]). The threshold-0 samples are also compared with the plain eager model.

Writes `<out>.json`, `<out>.md` (a table, with the device, versions, date and command) and `<out>.png` (the
plot), plus `<out>_samples.png` (the grids side by side). `--out` defaults to
benchmarks/results/fbcache_sweep_digits_<cpu or cuda>_world<world size>.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import paracompile  # noqa: E402
import digits_model as digits  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.08, 0.12, 0.2])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--per-class", type=int, default=10, help="samples of each digit (batch = 10x this)")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling runs per threshold")
    parser.add_argument("--compiler", choices=["eager", "inductor"], default=None,
                        help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.thresholds[0] != 0:
        args.thresholds = [0.0] + args.thresholds

    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    compiler = args.compiler or ("inductor" if cuda else "eager")
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    out = args.out or ROOT / "benchmarks" / "results" / f"fbcache_sweep_digits_{'cuda' if cuda else 'cpu'}_world{world_size}"

    def log(*values) -> None:
        if rank == 0:
            print(*values, flush=True)

    transformer, label_encoder = digits.load(device=device)
    labels = torch.arange(digits.NUM_CLASSES, device=device).repeat(args.per_class)
    noise = torch.randn(len(labels), 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    log(f"device {device_name}, world size {world_size}, compiler {compiler!r}, torch {torch.__version__}, "
        f"{len(labels)} samples x {args.steps} steps")

    eager = digits.sample(transformer, label_encoder, labels, noise, args.steps)
    # Compile every threshold first (each its own torch.compile; Dynamo keeps one entry per backend), then
    # time the runs interleaved, threshold after threshold, so that a machine whose load drifts slows all alike.
    models, first_call = [], []
    for threshold in args.thresholds:
        models.append(torch.compile(transformer, backend="paracompile", options={
            "mesh": {"ulysses": world_size}, "compiler": compiler, "threshold": threshold}))
        synchronize()
        start = time.perf_counter()
        digits.sample(models[-1], label_encoder, labels, noise, steps=1)  # compiles
        synchronize()
        first_call.append(time.perf_counter() - start)
        log(f"threshold {threshold:<5g} compiled, first call {first_call[-1]:.1f} s")
    seconds = [[] for _ in args.thresholds]
    cpu_seconds = [[] for _ in args.thresholds]  # this process's CPU time: on a shared CPU, steadier than wall time
    hit_counts = [[] for _ in args.thresholds]
    images = [None for _ in args.thresholds]
    for repeat in range(args.repeats):
        for i, model in enumerate(models):
            paracompile.reset_cache()
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            images[i] = digits.sample(model, label_encoder, labels, noise, args.steps)
            synchronize()
            seconds[i].append(time.perf_counter() - start)
            cpu_seconds[i].append(time.process_time() - cpu_start)
            stats = paracompile.cache_stats()
            hit_counts[i].append((sum(s["hits"] for s in stats), sum(s["hits"] + s["misses"] for s in stats)))
        log(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{s[-1]:.2f} s" for s in seconds))
    reference = images[0]
    rows = []
    for i, threshold in enumerate(args.thresholds):
        hits, calls = hit_counts[i][-1]
        if threshold == 0:
            hits, calls = 0, args.steps  # no cache: every call runs every block
        row = dict(threshold=threshold, hits=hits, calls=calls, hit_ratio=hits / calls,
                   hits_per_repeat=[h for h, _ in hit_counts[i]], run_s=[round(s, 4) for s in seconds[i]],
                   median_run_s=statistics.median(seconds[i]), first_call_s=round(first_call[i], 2),
                   cpu_run_s=[round(s, 4) for s in cpu_seconds[i]], median_cpu_run_s=statistics.median(cpu_seconds[i]),
                   max_abs_error=(images[i] - reference).abs().max().item(),
                   mean_abs_error=(images[i] - reference).abs().mean().item())
        if threshold == 0:
            row["vs_eager_max_abs"] = (images[i] - eager).abs().max().item()
        rows.append(row)
        log(f"threshold {threshold:<5g} hits {hits:>3}/{calls:<3} run {row['median_run_s']:.3f} s  "
            f"max err {row['max_abs_error']:.4f}  mean err {row['mean_abs_error']:.5f}")
    grids = images
    for row in rows:
        row["speedup"] = rows[0]["median_run_s"] / row["median_run_s"]
        row["cpu_speedup"] = rows[0]["median_cpu_run_s"] / row["median_cpu_run_s"]

    if rank == 0:
        command = ("torchrun --nproc_per_node=%d " % world_size if world_size > 1 else "python ") + \
            " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
        report = dict(device=device_name, world_size=world_size, compiler=compiler, torch=torch.__version__,
                      date=time.strftime("%Y-%m-%d"), command=command, steps=args.steps, samples=len(labels),
                      repeats=args.repeats, threads=args.threads if not cuda else None,
                      model=dict(digits.TRANSFORMER_CONFIG), rows=rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=list) + "\n")
        out.with_suffix(".md").write_text(markdown(report) + "\n")
        plot(rows, out.with_name(out.name + ".png"), report)
        titles = [f"threshold {r['threshold']:g}: {100 * r['hit_ratio']:.0f}% hits" for r in rows]
        from quickstart import side_by_side
        side_by_side([digits.to_grid(g[: 5 * digits.NUM_CLASSES], columns=digits.NUM_CLASSES, scale=4)
                      for g in grids], titles).save(out.with_name(out.name + "_samples.png"))
        print(markdown(report))
        print(f"wrote {out}.json, .md, .png and _samples.png")
    if dist.is_initialized():
        dist.destroy_process_group()


def table(rows: list[dict], cpu: bool) -> str:
    cpu_head, cpu_rule = (" CPU time per run | speedup (CPU time) |", "---|---|") if cpu else ("", "")
    lines = [f"| threshold | hit ratio | wall time per run | speedup (wall) |{cpu_head} max abs error | mean abs error |",
             f"|---|---|---|---|{cpu_rule}---|---|"]
    for r in rows:
        hits = "off" if r["threshold"] == 0 else f"{r['hits']}/{r['calls']} ({100 * r['hit_ratio']:.0f}%)"
        cpu_cells = f" {r['median_cpu_run_s']:.3f} s | {r['cpu_speedup']:.2f}x |" if cpu else ""
        lines.append(f"| {r['threshold']:g} | {hits} | {r['median_run_s']:.3f} s | {r['speedup']:.2f}x |{cpu_cells} "
                     f"{r['max_abs_error']:.4f} | {r['mean_abs_error']:.5f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["model"]
    return "\n".join([
        "# First Block Cache sweep on the digits model",
        "",
        f"- Device: {report['device']}, world size {report['world_size']}"
        + (f", {report['threads']} CPU thread(s) per process" if report["threads"] else "")
        + f"; compiler `{report['compiler']}`; torch {report['torch']}; {report['date']}.",
        f"- Command: `{report['command']}`",
        f"- Model: examples/digits_dit (FluxTransformer2DModel, {m['num_layers']} double + {m['num_single_layers']} "
        f"single blocks, {m['num_attention_heads']} heads of {m['attention_head_dim']}); {report['samples']} samples "
        f"(10 digits), {report['steps']} Euler steps, 1 transformer call per step; {report['repeats']} timed runs per "
        "threshold, `paracompile.reset_cache()` before each.",
        "- Hit ratio: transformer calls that skipped every block after the first. Speedup: median time of a "
        "sampling run at threshold 0 over that at the threshold (the runs of all thresholds interleaved). "
        + ("CPU time: this process's (rank 0's) CPU time, steadier than wall time on a shared machine. "
           if report["threads"] else "")
        + "Errors: against the threshold-0 samples, pixels in [-1, 1].",
        f"- Threshold 0 against the plain eager model: max abs {report['rows'][0].get('vs_eager_max_abs', float('nan')):.2e}.",
        "",
        table(report["rows"], cpu=bool(report["threads"])),
    ])


def plot(rows: list[dict], path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = [r["threshold"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(thresholds, [r["speedup"] for r in rows], "o-", color="C0", label="speedup (wall time)")
    if report["threads"]:
        left.plot(thresholds, [r["cpu_speedup"] for r in rows], "^:", color="C2", label="speedup (CPU time)")
    left.set_ylabel("speedup (x)", color="C0")
    left.set_xlabel("threshold")
    left.set_title("speed")
    left.grid(alpha=0.3)
    ratio = left.twinx()
    ratio.plot(thresholds, [100 * r["hit_ratio"] for r in rows], "s--", color="C1", label="hit ratio")
    ratio.set_ylabel("hit ratio (%)", color="C1")
    ratio.set_ylim(0, 100)
    lines = left.get_lines() + ratio.get_lines()
    left.legend(lines, [line.get_label() for line in lines], loc="upper left")
    right.plot(thresholds, [r["max_abs_error"] for r in rows], "o-", label="max |x - x(threshold 0)|")
    right.plot(thresholds, [r["mean_abs_error"] for r in rows], "s-", label="mean |x - x(threshold 0)|")
    right.set_xlabel("threshold")
    right.set_title("error against the uncached samples")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(f"First Block Cache on the digits model: {report['device']}, world size {report['world_size']}, "
                 f"{report['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
