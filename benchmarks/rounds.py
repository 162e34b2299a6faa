"""Step time of several setups in one process group, measured in interleaved rounds (A B C A B C ...), so
that a noisy host slows every setup alike.

    torchrun --nproc_per_node=2 benchmarks/rounds.py --workload flux \\
        --setups inductor1,pc_ulysses,pc_ulysses_graphs,diffusers_ulysses --rounds 5 --steps 8 --out DIR
    torchrun --nproc_per_node=4 benchmarks/rounds.py --workload flux --tiny --setups inductor1,pc_ulysses,pc_ring,pc_u2r2

Workloads, random weights and inputs are benchmarks/compare.py's (FLUX.1-dev at 1024x1024, Wan 2.1 1.3B at
480x832x81; bf16; `--tiny` is a CPU dry run with gloo and the eager compiler). Setups:

| name | what runs |
|---|---|
| eager1 / inductor1 | rank 0 alone, the model as it is / `torch.compile(model)`; the other ranks wait |
| pc_ulysses, pc_ring | paracompile with the mesh {"ulysses": world} / {"ring": world} |
| pc_u2r2 | paracompile with {"ulysses": 2, "ring": world / 2} |
| ..._c2, ..._c4 | the same with `ulysses_chunks` 2 or 4 (each chunk's exchange overlaps another's attention) |
| ..._graphs | the same with `cuda_graphs=True` (paracompile/cuda_graphs.py) |
| ..._blocks | the same with `compile_blocks=True` (each distinct block compiled once) |
| ..._noreorder, ..._ovs | the same without the compute/communication reordering paracompile turns on for Ulysses / with Inductor's overlap scheduler instead |
| ..._reorder | the same with the reordering passes named explicitly (paracompile's default for Ulysses since 2026-11-28) |
| diffusers_ulysses, diffusers_ring | diffusers' native context parallelism over all ranks, then `torch.compile` (its own model copy) |
| paraattn_ulysses | para-attn 0.3.38 (with benchmarks/paraattn_shim.py), then `torch.compile` (its own model copy) |

Every setup is compiled and warmed up first (its first-call time recorded), then runs once more in an untimed
interleaved round (its time recorded: a setup that recompiles after the others ran shows there), then each round runs every setup
for `--steps` timed calls (a barrier and a device synchronize around each; a step's time is its slowest
rank's), and records the round's median. The table reports the median of the round medians and their spread
(lowest - highest). After the rounds, rank 0 profiles `--profile-steps` calls of each setup: GPU busy time per
step (the union of its kernels' intervals), kernels per step, and NCCL kernel time. Memory per setup: the
peak allocated over its first three calls (eager, capture, first replay), and what it still holds once the
allocator's cache is released (a CUDA graph's pool). Every output is compared with eager1's (rank 0, run
once before the rounds). Results: --out/rounds_<workload>.json and .md (rank 0).

Every setup compiles with a backend object of its own: Dynamo keeps compiled frames per code object, and
setups built from the same model class share code objects (diffusers' hooks and para-attn's wrapper call
the class's own forward as a frame of its own); with one shared "inductor" backend, a frame that a peer
compiled for its token shard could be the one another setup's call finds, on one rank only for inductor1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from compare import (build_inputs, build_model, init_fake_world, output_finite, versions,  # benchmarks/ is sys.path[0]
                     workload_spec)

GiB = 1024 ** 3

# Setup-name suffixes that patch Inductor's config: its compute/communication reordering passes.
INDUCTOR_VARIANTS = {
    "reorder": {"reorder_for_compute_comm_overlap": True,
                "reorder_for_compute_comm_overlap_passes": ["reorder_compute_for_overlap", "sink_waits",
                                                            "raise_comms"]},
    "noreorder": {"reorder_for_compute_comm_overlap": False},  # paracompile's default for Ulysses is on
    "ovs": {"aten_distributed_optimizations.enable_overlap_scheduling": True,
            "reorder_for_compute_comm_overlap": False},
}
PEERS = ("diffusers_ulysses", "diffusers_ring", "paraattn_ulysses")


def check_setup_name(name: str) -> None:
    """Refuses a name before any model is built (a full-size model per unknown name would not fit)."""
    parts = name.split("_")
    known = (name in ("eager1", "inductor1") or name in PEERS
             or (parts[0] == "pc" and len(parts) >= 2 and parts[1] in ("ulysses", "ring", "u2r2")
                 and all(p in ("graphs", "blocks") or p in INDUCTOR_VARIANTS or (p[0] == "c" and p[1:].isdigit())
                         for p in parts[2:])))
    if not known:
        raise SystemExit(f"rounds.py: unknown setup {name!r}; setups are eager1, inductor1, {', '.join(PEERS)}, and "
                         "pc_ulysses / pc_ring / pc_u2r2 with suffixes _graphs, _blocks, _c<N>, "
                         + ", ".join(f"_{v}" for v in INDUCTOR_VARIANTS))


def own_backend(name: str):
    """A backend callable for this setup alone (see the module docstring): Inductor, or eager with --tiny."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def eager(gm, example_inputs):
        return gm.forward

    chosen = eager if name == "eager" else backend
    chosen.__name__ = f"{chosen.__name__}_for_setup"
    return chosen


def make_setup(name: str, model_for, world: int, args, device):
    """(callable, the ranks that run it, facts) for one setup name."""
    if name == "eager1":
        return model_for("plain"), [0], {}
    if name == "inductor1":
        if args.tiny:
            import torch._inductor.config as inductor_config

            inductor_config.cpp.vec_isa_ok = False
        return torch.compile(model_for("plain"), backend=own_backend("inductor")), [0], {}
    ranks = list(range(world))
    if name.startswith("pc_"):
        from paracompile import paracompile_backend

        parts = name[3:].split("_")
        kind, graphs = parts[0], "graphs" in parts
        chunks = next((int(p[1:]) for p in parts if p.startswith("c") and p[1:].isdigit()), 1)
        mesh = {"ulysses": {"ulysses": world}, "ring": {"ring": world},
                "u2r2": {"ulysses": 2, "ring": world // 2}}[kind]
        options = {"mesh": mesh, "cuda_graphs": graphs, "ulysses_chunks": chunks}
        if "blocks" in parts:
            options["compile_blocks"] = True
        for part in parts:
            if part in INDUCTOR_VARIANTS:
                options.setdefault("inductor", {}).update(INDUCTOR_VARIANTS[part])
        if args.tiny:
            options.update(compiler="eager", cuda_graphs=False)
        extra = json.loads(args.paracompile_options or "{}")
        options.setdefault("inductor", {}).update(extra.pop("inductor", {}))  # merged, not replaced
        options.update(extra)
        compiled = torch.compile(model_for("plain"),
                                 backend=lambda gm, example: paracompile_backend(gm, example, options=options))
        return compiled, ranks, {"options": {k: v for k, v in options.items()}}
    style = name.split("_", 1)[1]
    model = model_for(name)  # the peers change the model they parallelise: each gets its own copy
    compile_backend = own_backend("eager" if args.tiny else "inductor")
    if name.startswith("diffusers_"):
        from diffusers import ContextParallelConfig

        if style == "ring":
            model.set_attention_backend("_native_cudnn")  # the native backend has no log-sum-exp
        model.enable_parallelism(config=ContextParallelConfig(**{f"{style}_degree": world}))
        return torch.compile(model, backend=compile_backend), ranks, {}
    if name.startswith("paraattn_"):
        import paraattn_shim

        paraattn_shim.apply()
        from para_attn.context_parallel import init_context_parallel_mesh
        from para_attn.context_parallel.diffusers_adapters import parallelize_transformer

        mesh = init_context_parallel_mesh(device.type, max_ring_dim_size=world if style == "ring" else 1)
        parallelize_transformer(model, mesh=mesh)
        return torch.compile(model, backend=compile_backend), ranks, {}
    raise ValueError(f"unknown setup {name!r}")


def quantized(model, scheme: str):
    """`model` quantized in place with torchao (`--quantize`): float8 dynamic activation + float8 weight."""
    if scheme == "none":
        return model
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    granularity = PerRow() if scheme == "float8_row" else PerTensor()
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
    return model


class StallWatchdog:
    """Prints this rank's Python stacks when it made no progress (no setup call began) for `seconds`, and
    again every `seconds` while the stall lasts. A Python thread that holds the GIL while it reads the
    frames: faulthandler's timer reads them from a C thread without the GIL and crashed a rank mid-compile."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds
        self.label, self.since = "start", time.monotonic()
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="stall-watchdog", daemon=True).start()

    def mark(self, label: str) -> None:
        self.label, self.since = label, time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(self.seconds / 4):
            stalled = time.monotonic() - self.since
            if stalled < self.seconds:
                continue
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            lines = [f"rank {self.rank}: no progress for {stalled:.0f} s, last: {self.label}"]
            for ident, frame in sys._current_frames().items():
                if ident != threading.get_ident():
                    lines.append(f"  thread {names.get(ident, ident)}:")
                    lines.extend("    " + line.rstrip() for line in traceback.format_stack(frame)[-12:])
            print("\n".join(lines), flush=True)
            self.since = time.monotonic()


def profile(run, steps: int, trace_path: str | None = None) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    gap_summary = {}
    if trace_path is not None:
        import gzip
        import shutil

        from gaps import load, summarize

        prof.export_chrome_trace(trace_path)
        gap_summary = {"gaps": summarize(load(trace_path), steps)}
        with open(trace_path, "rb") as source, gzip.open(trace_path + ".gz", "wb") as target:
            shutil.copyfileobj(source, target)
        os.remove(trace_path)
    # The profiler also lists each collective's annotation (`nccl:all_to_all`) as a CUDA event spanning its
    # kernel: counting it would count every collective twice.
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and not e.name.startswith("nccl:")]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    nccl = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower())
    return dict(gpu_busy_ms=round(busy / 1000 / steps, 3), kernels_per_step=round(len(kernels) / steps, 1),
                nccl_ms=round(nccl / 1000 / steps, 3), **gap_summary)



def _finite_text(result: dict) -> str:
    """A fake world's outputs are not compared with eager; the column says whether they are finite (a build
    computing on NaN runs at another power draw and clock: compare.init_fake_world)."""
    if "output_finite" not in result:
        return "-"
    return "finite" if result["output_finite"] else "NOT FINITE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="flux", choices=["flux", "wan"])
    parser.add_argument("--setups", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--blocks", default=None, help="FLUX: 'double,single'; Wan: 'blocks'")
    parser.add_argument("--paracompile-options", default=None, help="JSON merged into every pc_ setup's options")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--watchdog", type=float, default=0,
                        help="seconds: a rank in which no setup call began for this long prints its threads' stacks, "
                        "and again as often while it stays stalled (pick more than the longest compile: a stall then "
                        "shows where each rank waits)")
    parser.add_argument("--trace", default="", help="comma list of setups whose profile is saved as a Chrome trace "
                        "(--out/trace_<setup>.json.gz) and read for idle gaps (benchmarks/gaps.py)")
    parser.add_argument("--quantize", default="none", choices=["none", "float8", "float8_row"],
                        help="quantize every model with torchao first: float8 dynamic activation + float8 weight, "
                        "per-tensor scales (para-attn's FLUX recipe) or per-row")
    parser.add_argument("--fake-world", type=int, default=0,
                        help="run alone as rank 0 of a world of this size whose collectives move no data (torch's fake "
                        "process group): rank 0's compute of a multi-rank setup on one GPU. Its times are no step "
                        "times and its outputs are not compared")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    for name in args.setups.split(","):
        check_setup_name(name)

    # Each setup adds its own compiled frames to the model class's code objects (see own_backend).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(args.setups.split(",")))
    cuda = torch.cuda.is_available() and not args.tiny
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.fake_world:
        init_fake_world(args.fake_world)
    else:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = workload_spec(args.workload, args.tiny, args.blocks)
    inputs = build_inputs(spec, device, dtype)
    models: dict = {}

    def model_for(key: str):
        if key not in models:
            models[key] = quantized(build_model(spec, device, dtype), args.quantize)
        return models[key]

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    with torch.inference_mode():
        reference = model_for("plain")(**inputs)[0] if rank == 0 else None
    names = args.setups.split(",")
    watchdog = StallWatchdog(rank, args.watchdog) if args.watchdog else None
    setups, results = {}, {}
    for name in names:
        result = results[name] = dict(setup=name)
        try:
            runner, ranks, facts = make_setup(name, model_for, world, args, device)
            result.update(facts, ranks=ranks)
            mine = rank in ranks

            def call(runner=runner, mine=mine, name=name):
                if watchdog is not None:
                    watchdog.mark(name)
                if mine:
                    with torch.inference_mode():
                        return runner(**inputs)[0]
                return None

            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                reserved_before = torch.cuda.memory_reserved()
            sync()
            start = time.perf_counter()
            output = call()
            sync()
            result["first_call_s"] = round(time.perf_counter() - start, 1)
            if rank == 0:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: first call {result['first_call_s']} s", flush=True)
            for _ in range(max(args.warmup, 2)):
                output = call()
            sync()
            if cuda and mine:
                result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
                torch.cuda.empty_cache()
                result["held_after_gib"] = round((torch.cuda.memory_reserved() - reserved_before) / GiB, 2)
            if rank == 0 and output is not None and not args.fake_world:
                result["max_abs_diff_vs_eager1"] = round((output.float() - reference.float()).abs().max().item(), 5)
            if rank == 0 and output is not None and args.fake_world:
                result["output_finite"] = output_finite(output)  # see compare.init_fake_world
            setups[name] = call
        except Exception:
            result["error"] = traceback.format_exc(limit=8)
            print(f"rank {rank}: setup {name} failed:\n{result['error']}", flush=True)
        # Every rank learns whether any rank failed, so that all skip the setup together.
        failed = torch.tensor([float("error" in result)], device=device)
        dist.all_reduce(failed)
        if failed.item() and name in setups:
            del setups[name]
            result.setdefault("error", "failed on another rank")

    # One untimed round in round order first: a setup that recompiles when it runs after the others (seen
    # on 2x H200 with the peers: the first interleaved round of FLUX 2+4 blocks took 72 s, minutes at full
    # size) does it here, and the time each setup took says which one it was.
    for name, call in setups.items():
        sync()
        start = time.perf_counter()
        call()
        sync()
        results[name]["interleaved_warmup_s"] = round(time.perf_counter() - start, 2)
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}] interleaved warm-up round (s): "
              + json.dumps({name: results[name]["interleaved_warmup_s"] for name in setups}), flush=True)
    rounds = {name: [] for name in setups}
    for index in range(args.rounds):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] round {index + 1} of {args.rounds}", flush=True)
        for name, call in setups.items():
            times = []
            for _ in range(args.steps):
                sync()
                start = time.perf_counter()
                call()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            slowest = torch.tensor(times, dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            rounds[name].append(1000 * statistics.median(slowest.tolist()))
    if rank == 0:
        print(f"[{time.strftime('%H:%M:%S')}] round medians (ms): "
              + json.dumps({name: [round(m, 2) for m in medians] for name, medians in rounds.items()}), flush=True)
    for name in setups:
        medians = rounds[name]
        results[name].update(round_medians_ms=[round(m, 2) for m in medians],
                             median_ms=round(statistics.median(medians), 2),
                             spread_ms=[round(min(medians), 2), round(max(medians), 2)])

    def write_report(stage: str) -> None:
        """The table and the JSON so far: written after the rounds and again after the profiles, so that a
        run stopped while profiling keeps its timings."""
        if rank != 0:
            return
        baseline = results.get("inductor1", {}).get("median_ms")
        meta = dict(versions(), device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world,
                    workload=spec["description"], date=datetime.date.today().isoformat(),
                    command=f"torchrun --nproc_per_node={world} " + " ".join(shlex.quote(a) for a in sys.argv),
                    rounds=args.rounds, steps_per_round=args.steps, quantize=args.quantize)
        if args.quantize != "none":
            import torchao

            meta.update(torchao=torchao.__version__)
        if args.fake_world:
            meta.update(command="python " + " ".join(shlex.quote(a) for a in sys.argv),
                        fake_world=f"one process as rank 0 of {world}; collectives move no data: rank 0's compute "
                        "and launch cost, not a step time, and outputs are not compared with eager (the last column "
                        "says whether they are finite: a build computing on NaN draws less power and clocks higher)")
        machine = f"{meta['device']} x1, rank 0 of a fake world of {world}" if args.fake_world else f"{meta['device']} x{world}"
        lines = [f"# {args.workload}: interleaved rounds, {machine}", "",
                 *([f"**Fake process group:** {meta['fake_world']}.", ""] if args.fake_world else []),
                 f"{meta['workload']}"
                 + (f", quantized with torchao {meta['torchao']} ({args.quantize})" if args.quantize != "none" else "")
                 + f"; torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}; "
                 f"{args.rounds} rounds x {args.steps} steps, a step's time is its slowest rank's.", "",
                 f"`{meta['command']}`", "",
                 "| setup | ms / step (median of round medians) | round medians, lowest - highest | vs inductor1 "
                 "| GPU busy ms / step (rank 0) | kernels / step | NCCL ms / step | peak allocated GiB | held after GiB "
                 "| first call s | max abs diff vs eager1 |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            r = results[name]
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:120]} |" + " |" * 9)
                continue
            speedup = f"{baseline / r['median_ms']:.2f}x" if baseline else "-"
            lines.append(f"| {name} | {r['median_ms']} | {r['spread_ms'][0]} - {r['spread_ms'][1]} | {speedup} | "
                         f"{r.get('gpu_busy_ms', '-')} | {r.get('kernels_per_step', '-')} | {r.get('nccl_ms', '-')} | "
                         f"{r.get('peak_allocated_gib', '-')} | {r.get('held_after_gib', '-')} | {r['first_call_s']} | "
                         f"{r.get('max_abs_diff_vs_eager1', _finite_text(r))} |")
        table = "\n".join(lines)
        print(table if stage == "final" else f"[{time.strftime('%H:%M:%S')}] timings written", flush=True)
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"rounds_{spec['tag']}")
        with open(stem + ".json", "w") as handle:
            json.dump(dict(meta=meta, results=results), handle, indent=1)
        with open(stem + ".md", "w") as handle:
            handle.write(table + "\n")

    write_report("timings")
    for name, call in setups.items():
        sync()
        if rank == 0:
            trace = os.path.join(args.out, f"trace_{name}.json") if name in args.trace.split(",") else None
            if trace:
                os.makedirs(args.out, exist_ok=True)
            results[name].update(profile(call, args.profile_steps, trace))
        else:
            for _ in range(args.profile_steps):
                call()
        sync()

    write_report("final")
    if watchdog is not None:
        watchdog.stop()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
