"""First-call (compile) time of one model, compiled whole against `compile_blocks=True`, each in a fresh
process with an empty Inductor cache directory.

    python benchmarks/compile_time.py --workload flux --tiny --blocks 8,16 --out benchmarks/results
    python benchmarks/compile_time.py --workload flux --fake-world 2 --steps 20 --second 48x85 --out DIR
    python benchmarks/compile_time.py --workload wan --fake-world 2 --variants whole,blocks --warm --out DIR

Each variant runs in its own process (a child of this one) so that no in-memory cache carries over, with
`TORCHINDUCTOR_CACHE_DIR` set to a new empty directory; the child builds the workload's model and inputs
(benchmarks/compare.py), compiles it with paracompile on one process (`mesh` of one rank: plain Inductor,
or Inductor per block; with `--fake-world N`, as rank 0 of N ranks whose collectives move no data, so the
sharding rewrite and the collectives compile as on a real mesh), and reports the first call's wall time,
the median step time after it, the output's largest difference from eager (not with a fake world) and,
with `--second`, the first call and step time at a second resolution (Dynamo recompiles for it unless the
variant is `_dynamic`: the token dims marked dynamic before the first call, `torch._dynamo.mark_dynamic`). `--tiny` runs the CPU configs in float32; without
it, the full-size model in bf16 on the GPU. Results: --out/compile_time_<tag>.json and .md.

`--warm`: after a variant's cold child, a second fresh child of the same variant runs with the same cache
directory (`TORCHINDUCTOR_CACHE_DIR`, and `TRITON_CACHE_DIR` set to its `triton/` folder), so Inductor's FX
graph and AOTAutograd caches and the Triton kernels on disk are warm while nothing is in memory: its first
call is the warm start (Dynamo still traces and paracompile still rewrites; Inductor's codegen and Triton's
compiles are what the disk caches skip). Each child also reports Inductor's cache hits/misses/bypasses and
the Dynamo graphs compiled after the first call and after the steps (more after the steps: a recompile).
Results: --out/compile_time_<tag>[_fakeN]_warm.json and .md.
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
    import statistics

    import torch

    sys.path.insert(0, HERE)
    from compare import build_inputs, build_model, init_fake_world, output_finite, workload_spec

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = workload_spec(args.workload, args.tiny, args.blocks)
    model = build_model(spec, device, dtype)
    inputs = build_inputs(spec, device, dtype)
    from paracompile import paracompile_backend

    options = {"compile_blocks": args.variant.startswith("blocks")}
    if args.fake_world:
        init_fake_world(args.fake_world)
        options.update(mesh={"ulysses": args.fake_world}, check_inputs="off")
    compiled = torch.compile(model, backend=lambda gm, example: paracompile_backend(gm, example, options=options))
    if args.variant.endswith("_dynamic"):
        # The token count symbolic from the first compile, the rest static (README: "A new resolution").
        if args.workload == "flux":
            torch._dynamo.mark_dynamic(inputs["hidden_states"], 1)
            torch._dynamo.mark_dynamic(inputs["img_ids"], 0)
        else:
            torch._dynamo.mark_dynamic(inputs["hidden_states"], [2, 3, 4])

    def timed_call(call_inputs):
        start = time.perf_counter()
        output = compiled(**call_inputs)[0]
        if cuda:
            torch.cuda.synchronize()
        return output, time.perf_counter() - start

    from torch._dynamo.utils import counters

    result = dict(variant=args.variant)
    with torch.no_grad():
        reference = model(**inputs)[0]
        output, result["first_call_s"] = timed_call(inputs)
        graphs_after_first_call = counters["stats"]["unique_graphs"]
        steps = [timed_call(inputs)[1] for _ in range(max(args.steps, 1))]
        result["step_ms"] = round(1000 * statistics.median(steps), 2)
        result["dynamo_graphs"] = dict(after_first_call=graphs_after_first_call,
                                       after_steps=counters["stats"]["unique_graphs"])
        result["caches"] = {f"{group}_{event}": counters[group][f"{name}_{event}"]
                            for group, name in (("inductor", "fxgraph_cache"), ("aot_autograd", "autograd_cache"))
                            for event in ("hit", "miss", "bypass")}
        if not args.fake_world:  # a fake world's collectives move no data: its output means nothing
            result["max_abs_diff_vs_eager"] = float((output.float() - reference.float()).abs().max())
        else:
            result["output_finite"] = output_finite(output)  # see compare.init_fake_world
        if args.second:
            rows, cols = (int(n) for n in args.second.split("x"))
            second = build_inputs(dict(spec, rows=rows, cols=cols), device, dtype)
            result["second_resolution"] = args.second
            result["second_resolution_first_call_s"] = round(timed_call(second)[1], 2)
            result["second_resolution_step_ms"] = round(
                1000 * statistics.median(timed_call(second)[1] for _ in range(max(args.steps, 1))), 2)
    result["first_call_s"] = round(result["first_call_s"], 2)
    result.update(description=spec["description"], tag=spec["tag"], torch=torch.__version__,
                  device=torch.cuda.get_device_name(device) if cuda else "cpu")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="flux", choices=["flux", "wan"])
    parser.add_argument("--blocks", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--variants", default="whole,blocks",
                        help="whole, blocks (compile_blocks=True), and either with _dynamic (token dims marked dynamic)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls after the first (the median is reported)")
    parser.add_argument("--second", default=None, help="FLUX: a second resolution as packed latent rows x columns "
                        "(768x1360: 48x85), called after the first's steps: its first call and step time")
    parser.add_argument("--fake-world", type=int, default=0,
                        help="compile as rank 0 of a world of this size with the mesh {'ulysses': N} (torch's fake "
                        "process group: the rewrite and every collective compile, collectives move no data)")
    parser.add_argument("--warm", action="store_true",
                        help="after each variant's cold child, a second fresh child with the same (now filled) "
                        "Inductor/Triton cache directory: its first call is the warm start")
    parser.add_argument("--out", default=".")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    results = []
    if args.second and args.workload != "flux":
        raise SystemExit("--second is for FLUX (rows x columns of packed latents)")
    for variant in args.variants.split(","):
        if variant.removesuffix("_dynamic") not in ("whole", "blocks"):
            raise SystemExit(f"unknown variant {variant!r}; variants are whole, blocks, whole_dynamic, blocks_dynamic")
        with tempfile.TemporaryDirectory() as cache:
            command = [sys.executable, os.path.abspath(__file__), "--workload", args.workload, "--variant", variant]
            command += (["--tiny"] if args.tiny else []) + (["--blocks", args.blocks] if args.blocks else [])
            command += ["--steps", str(args.steps), "--fake-world", str(args.fake_world)]
            command += ["--second", args.second] if args.second else []
            # Triton's own default is ~/.triton/cache, shared by every process: keep its kernels in the
            # variant's directory too (where Inductor would put them: <cache>/triton/<device>).
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            results.append(run_child(command, env, variant))
            if args.warm:
                results[-1]["cache_after_cold"] = cache_contents(cache)
                warm = run_child(command, env, variant + " (warm)")
                results[-1].update(warm_first_call_s=warm["first_call_s"], warm_step_ms=warm["step_ms"],
                                   warm_process_s=warm["process_s"], warm_dynamo_graphs=warm["dynamo_graphs"],
                                   warm_caches=warm["caches"])
                for key in ("second_resolution_first_call_s", "second_resolution_step_ms"):
                    if key in warm:
                        results[-1]["warm_" + key] = warm[key]
            print(results[-1], flush=True)
        write_results(args, results)  # after each variant: a run cut short keeps what it measured


def run_child(command: list, env: dict, what: str) -> dict:
    start = time.perf_counter()
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    line = next((l for l in finished.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{what} failed:\n{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result["process_s"] = round(time.perf_counter() - start, 1)  # the whole child: imports, model, eager call
    return result


def cache_contents(cache: str) -> dict:
    """Files and MB under a cache directory, and under its triton/ folder (Triton's compiled kernels)."""
    def walk(top):
        sizes = [os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(top) for name in names]
        return len(sizes), round(sum(sizes) / 2**20, 1)

    files, mb = walk(cache)
    triton_files, triton_mb = walk(os.path.join(cache, "triton"))
    return dict(files=files, mb=mb, triton_files=triton_files, triton_mb=triton_mb)


def write_results(args, results: list) -> None:
    meta = dict(date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv),
                workload=results[0]["description"], torch=results[0]["torch"], device=results[0]["device"],
                cpus=os.cpu_count())
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compile_time_{results[0]['tag']}" + (f"_fake{args.fake_world}" if args.fake_world else "")
                        + ("_warm" if args.warm else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(dict(meta=meta, results=results), handle, indent=1)
    where = (f"one process as rank 0 of {args.fake_world} (mesh ulysses {args.fake_world}; torch's fake process "
             "group: collectives move no data, so outputs are not compared)") if args.fake_world else "one process"
    lines = [f"# First call: whole graph against compile once per block ({meta['device']})", "",
             f"{meta['workload']}; torch {meta['torch']}, {meta['cpus']} CPUs, {meta['date']}; {where}, each "
             "variant in a fresh process with an empty Inductor cache directory; step time: median of "
             f"{args.steps} calls after the first.", "", f"`{meta['command']}`", ""]
    if not args.warm:
        lines += ["| variant | first call s | step ms | max abs diff vs eager | second resolution | its first call s "
                  "| its step ms |", "|---|---|---|---|---|---|---|"]
        for r in results:
            diff = f"{r['max_abs_diff_vs_eager']:.2e}" if "max_abs_diff_vs_eager" in r else "-"
            lines.append(f"| {r['variant']} | {r['first_call_s']} | {r['step_ms']} | {diff} | "
                         f"{r.get('second_resolution', '-')} | {r.get('second_resolution_first_call_s', '-')} | "
                         f"{r.get('second_resolution_step_ms', '-')} |")
    else:
        lines += ["Warm: a second fresh process of the same variant with the cold run's cache directory "
                  "(`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR` = its `triton/`): Inductor's FX graph and "
                  "AOTAutograd caches and Triton's kernels on disk, nothing in memory; Dynamo still traces and "
                  "paracompile still rewrites. Cache hits: Inductor FX graph cache hit/miss/bypass in that "
                  "process. Graphs: Dynamo graphs after the first call / after the steps (more after: a recompile). "
                  "Process s: the whole child (imports, model build, an eager call, the first call, the steps).",
                  "", "| variant | cold first call s | warm first call s | step ms (cold / warm process) | "
                  "max abs diff vs eager | cache after cold: files, MB (triton files, MB) | FX graph cache "
                  "hit/miss/bypass cold / warm | graphs cold / warm | process s cold / warm |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            diff = f"{r['max_abs_diff_vs_eager']:.2e}" if "max_abs_diff_vs_eager" in r else "-"
            c = r["cache_after_cold"]
            hits = " / ".join("/".join(str(caches[f"inductor_{e}"]) for e in ("hit", "miss", "bypass"))
                              for caches in (r["caches"], r["warm_caches"]))
            graphs = " / ".join(f"{g['after_first_call']}, {g['after_steps']}"
                                for g in (r["dynamo_graphs"], r["warm_dynamo_graphs"]))
            lines.append(f"| {r['variant']} | {r['first_call_s']} | {r['warm_first_call_s']} | "
                         f"{r['step_ms']} / {r['warm_step_ms']} | {diff} | {c['files']}, {c['mb']} "
                         f"({c['triton_files']}, {c['triton_mb']}) | {hits} | {graphs} | "
                         f"{r['process_s']} / {r['warm_process_s']} |")
        if any("second_resolution" in r for r in results):
            lines += ["", "| variant | second resolution | its first call s cold / warm | its step ms cold / warm |",
                      "|---|---|---|---|"]
            for r in results:
                lines.append(f"| {r['variant']} | {r.get('second_resolution', '-')} | "
                             f"{r.get('second_resolution_first_call_s', '-')} / "
                             f"{r.get('warm_second_resolution_first_call_s', '-')} | "
                             f"{r.get('second_resolution_step_ms', '-')} / "
                             f"{r.get('warm_second_resolution_step_ms', '-')} |")
    with open(stem + ".md", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
