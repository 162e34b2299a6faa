"""Block caches: quality against speed on the digits model (examples/digits_model.py).

    python benchmarks/fbcache_sweep.py                                  # one process, First Block Cache only
    python benchmarks/fbcache_sweep.py --methods fbcache dbcache_f2b1 taylorseer1 dbcache_f2b1_taylorseer1
    torchrun --nproc_per_node=2 benchmarks/fbcache_sweep.py             # Ulysses over 2 processes

For each method (benchmarks/cache_methods.py: First Block Cache, DBCache's front/back blocks, TaylorSeer's
extrapolated residual) and each threshold (0 is the cache off, the reference), the transformer is compiled with paracompile
(`options={"mesh": {"ulysses": world_size}, "threshold": t, **method}`), then the same grid of digits is
sampled `--repeats` times from the same noise, `paracompile.reset_cache()` before each run; the runs of all
setups are interleaved, so that a busy machine slows them alike. Per setup: the hit ratio (transformer calls
that skipped the cached blocks), the speedup (median time of a sampling run at threshold 0 over that of the
setup) and the error against the threshold-0 samples (max and mean |difference|, pixels in [-1, 1]). The
threshold-0 samples are also compared with the plain eager model. A method's threshold gives another hit
ratio than another method's (their decisions read other residuals), so the plot compares them at matched
hit ratios: error and speedup against the hit ratio.

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
from cache_methods import METHODS  # noqa: E402  (benchmarks/ is sys.path[0])
import digits_model as digits  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.08, 0.12, 0.2])
    parser.add_argument("--methods", nargs="+", default=["fbcache"], choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--per-class", type=int, default=10, help="samples of each digit (batch = 10x this)")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling runs per threshold")
    parser.add_argument("--compiler", choices=["eager", "inductor"], default=None,
                        help="default: inductor on CUDA, eager on CPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    thresholds = [t for t in args.thresholds if t > 0]
    # (method, threshold); threshold 0 (no cache) once, first.
    setups = [("off", 0.0)] + [(method, t) for method in args.methods for t in thresholds]

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
    methods = "" if args.methods == ["fbcache"] else "_methods"
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"fbcache_sweep{methods}_digits_{'cuda' if cuda else 'cpu'}_world{world_size}"

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
    # Compile every setup first (each its own torch.compile; Dynamo keeps one entry per backend), then time
    # the runs interleaved, setup after setup, so that a machine whose load drifts slows all alike.
    models, first_call = [], []
    # Every setup is its own torch.compile of one forward: Dynamo's per-code-object limit (8) would send the
    # later setups to plain eager without a word.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(setups) + 1)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * len(setups))
    for method, threshold in setups:
        models.append(torch.compile(transformer, backend="paracompile", options={
            "mesh": {"ulysses": world_size}, "compiler": compiler, "threshold": threshold,
            **METHODS.get(method, {})}))
        synchronize()
        start = time.perf_counter()
        digits.sample(models[-1], label_encoder, labels, noise, steps=1)  # compiles
        synchronize()
        first_call.append(time.perf_counter() - start)
        log(f"{method} threshold {threshold:<5g} compiled, first call {first_call[-1]:.1f} s")
    seconds = [[] for _ in setups]
    cpu_seconds = [[] for _ in setups]  # this process's CPU time: on a shared CPU, steadier than wall time
    hit_counts = [[] for _ in setups]
    images = [None for _ in setups]
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
    for i, (method, threshold) in enumerate(setups):
        hits, calls = hit_counts[i][-1]
        if threshold > 0 and calls != args.steps:
            raise RuntimeError(f"{method} at threshold {threshold}: the cache counted {calls} calls of {args.steps} "
                               "(did the setup run without the cache?)")
        if threshold == 0:
            hits, calls = 0, args.steps  # no cache: every call runs every block
        row = dict(method=method, options=METHODS.get(method, {}), threshold=threshold, hits=hits, calls=calls,
                   hit_ratio=hits / calls,
                   hits_per_repeat=[h for h, _ in hit_counts[i]], run_s=[round(s, 4) for s in seconds[i]],
                   median_run_s=statistics.median(seconds[i]), first_call_s=round(first_call[i], 2),
                   cpu_run_s=[round(s, 4) for s in cpu_seconds[i]], median_cpu_run_s=statistics.median(cpu_seconds[i]),
                   max_abs_error=(images[i] - reference).abs().max().item(),
                   mean_abs_error=(images[i] - reference).abs().mean().item())
        if threshold == 0:
            row["vs_eager_max_abs"] = (images[i] - eager).abs().max().item()
        rows.append(row)
        log(f"{method:<26} threshold {threshold:<5g} hits {hits:>3}/{calls:<3} run {row['median_run_s']:.3f} s  "
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
                      methods={name: METHODS[name] for name in args.methods},
                      repeats=args.repeats, threads=args.threads if not cuda else None,
                      model=dict(digits.TRANSFORMER_CONFIG), rows=rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=list) + "\n")
        out.with_suffix(".md").write_text(markdown(report) + "\n")
        plot(rows, out.with_name(out.name + ".png"), report)
        # The uncached grid, then each method at its largest threshold (the most hits, the most visible error).
        shown = [0] + [max((i for i, r in enumerate(rows) if r["method"] == method), key=lambda i: rows[i]["threshold"])
                       for method in args.methods]
        titles = [f"{rows[i]['method']} {rows[i]['threshold']:g}: {100 * rows[i]['hit_ratio']:.0f}% hits" for i in shown]
        from quickstart import side_by_side
        side_by_side([digits.to_grid(grids[i][: 5 * digits.NUM_CLASSES], columns=digits.NUM_CLASSES, scale=4)
                      for i in shown], titles).save(out.with_name(out.name + "_samples.png"))
        print(markdown(report))
        print(f"wrote {out}.json, .md, .png and _samples.png")
    if dist.is_initialized():
        dist.destroy_process_group()


def table(rows: list[dict], cpu: bool) -> str:
    cpu_head, cpu_rule = (" CPU time per run | speedup (CPU time) |", "---|---|") if cpu else ("", "")
    lines = [f"| method | threshold | hit ratio | wall time per run | speedup (wall) |{cpu_head} max abs error | "
             "mean abs error |",
             f"|---|---|---|---|---|{cpu_rule}---|---|"]
    for r in rows:
        hits = "off" if r["threshold"] == 0 else f"{r['hits']}/{r['calls']} ({100 * r['hit_ratio']:.0f}%)"
        cpu_cells = f" {r['median_cpu_run_s']:.3f} s | {r['cpu_speedup']:.2f}x |" if cpu else ""
        lines.append(f"| {r.get('method', 'fbcache')} | {r['threshold']:g} | {hits} | {r['median_run_s']:.3f} s | "
                     f"{r['speedup']:.2f}x |{cpu_cells} {r['max_abs_error']:.4f} | {r['mean_abs_error']:.5f} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["model"]
    return "\n".join([
        "# Block cache sweep on the digits model",
        "",
        "- Methods: " + "; ".join(f"`{name}` = {options or 'First Block Cache (default options)'}"
                                  for name, options in report.get("methods", {"fbcache": {}}).items()) + ".",
        f"- Device: {report['device']}, world size {report['world_size']}"
        + (f", {report['threads']} CPU thread(s) per process" if report["threads"] else "")
        + f"; compiler `{report['compiler']}`; torch {report['torch']}; {report['date']}.",
        f"- Command: `{report['command']}`",
        f"- Model: examples/digits_dit (FluxTransformer2DModel, {m['num_layers']} double + {m['num_single_layers']} "
        f"single blocks, {m['num_attention_heads']} heads of {m['attention_head_dim']}); {report['samples']} samples "
        f"(10 digits), {report['steps']} Euler steps, 1 transformer call per step; {report['repeats']} timed runs per "
        "threshold, `paracompile.reset_cache()` before each.",
        "- Hit ratio: transformer calls that skipped the cached blocks. Speedup: median time of a "
        "sampling run at threshold 0 over that of the setup (the runs of all setups interleaved). "
        + ("CPU time: this process's (rank 0's) CPU time, steadier than wall time on a shared machine. "
           if report["threads"] else "")
        + "Errors: against the threshold-0 samples, pixels in [-1, 1].",
        f"- Threshold 0 against the plain eager model: max abs {report['rows'][0].get('vs_eager_max_abs', float('nan')):.2e}.",
        "",
        table(report["rows"], cpu=bool(report["threads"])),
    ])


def plot(rows: list[dict], path: Path, report: dict) -> None:
    """Speedup and error against the hit ratio, one line per method (thresholds in increasing order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["threshold"] > 0))
    for index, method in enumerate(methods):
        points = [rows[0]] + sorted((r for r in rows if r["method"] == method), key=lambda r: r["threshold"])
        ratios = [100 * r["hit_ratio"] for r in points]
        color = f"C{index}"
        left.plot(ratios, [r["cpu_speedup" if report["threads"] else "speedup"] for r in points], "o-", color=color,
                  label=method)
        right.plot(ratios, [r["mean_abs_error"] for r in points], "o-", color=color, label=f"{method} (mean)")
        right.plot(ratios, [r["max_abs_error"] for r in points], "^:", color=color, alpha=0.5, label=f"{method} (max)")
    left.set_xlabel("hit ratio (%)")
    left.set_ylabel("speedup (x, " + ("CPU time)" if report["threads"] else "wall time)"))
    left.set_title("speed")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("hit ratio (%)")
    right.set_yscale("symlog", linthresh=1e-4)
    right.set_title("error against the uncached samples")
    right.legend(fontsize=7, ncol=2)
    right.grid(alpha=0.3)
    fig.suptitle(f"Block caches on the digits model: {report['device']}, world size {report['world_size']}, "
                 f"{report['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
