"""Block cache step time: a FLUX-shaped transformer on a forced hit against a forced miss.

    torchrun --nproc_per_node=1 benchmarks/fbcache_step.py --out fbcache_step_1gpu.json
    torchrun --nproc_per_node=2 benchmarks/fbcache_step.py --out fbcache_step_2gpu.json
    torchrun --nproc_per_node=1 benchmarks/fbcache_step.py --methods fbcache dbcache_f8b0 taylorseer1
    torchrun --nproc_per_node=1 benchmarks/fbcache_step.py --tiny          # a dry run on a CPU

`--methods` (names from benchmarks/cache_methods.py) adds a miss and a hit variant per method besides
First Block Cache's (`miss:dbcache_f8b0`, `hit:dbcache_f8b0`, ...); hit variants run with `fbcache_warmup`
2, so that TaylorSeer's hits extrapolate from two computed steps.

The model is diffusers' FluxTransformer2DModel with FLUX.1-dev's dimensions (24 heads of 128, 4096-wide
text states, 64 latent channels) and random weights, `--blocks` double and `--single-blocks` single blocks
(19 and 38 by default, the full model), bf16 on CUDA. It is compiled three times with
`backend=functools.partial(paracompile_backend, options=...)`, Ulysses over all ranks:

- plain: `threshold` 0, no cache (the graph is not split);
- miss: `threshold` 1e-12: every call computes the residual difference, all-reduces it, and misses;
- hit: `threshold` 1e9: after the first call of the generation every call hits.

Each variant's calls use decreasing timesteps (one generation, one slot). Per variant: the median
per-call latency over `--steps` calls after `--warmup` calls (a barrier and a device synchronize around
every call), the hits and misses it counted (`paracompile.cache_stats()`), and the output's distance to
the plain variant's (the miss must match it within bf16 rounding of a differently fused graph; the hit is
the cached approximation). Writes a JSON to `--out` (rank 0).
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

import paracompile
from cache_methods import METHODS  # benchmarks/ is sys.path[0]
from paracompile import paracompile_backend
from paracompile.backend import explanations

MISS_THRESHOLD = 1e-12
HIT_THRESHOLD = 1e9


def flux_config(args) -> dict:
    config = dict(patch_size=1, in_channels=64, num_layers=args.blocks, num_single_layers=args.single_blocks,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if args.tiny:  # a dry run of this script on a CPU
        config.update(in_channels=16, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                      pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    return config


def flux_inputs(resolution: int, text_tokens: int, config: dict, device, dtype) -> dict:
    side = resolution // 16
    generator = torch.Generator(device=device).manual_seed(1)
    image_ids = torch.zeros(side * side, 3, device=device, dtype=dtype)
    rows = torch.arange(side, device=device)
    image_ids[:, 1] = rows.repeat_interleave(side).to(dtype)
    image_ids[:, 2] = rows.repeat(side).to(dtype)
    return dict(
        hidden_states=torch.randn(1, side * side, config["in_channels"], device=device, dtype=dtype,
                                  generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype,
                                          generator=generator),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype,
                                       generator=generator),
        timestep=torch.tensor([0.9], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=image_ids,
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timesteps:
    """Strictly decreasing timesteps, so that consecutive calls stay in one generation and one slot."""

    def __init__(self, inputs: dict):
        self.inputs = inputs
        self.base = inputs["timestep"].float()
        self.calls = 0

    def next_inputs(self) -> dict:
        # 1.1% of the first value apart (FLUX: 0.01 near 0.9, where bf16 resolves 2**-8; Wan: 5.5 near 500):
        # two calls whose timesteps round to one value would be two slots of one step (cond and uncond), each
        # with its own first miss.
        self.calls += 1
        value = self.base * (1 - 0.011 * self.calls)
        return dict(self.inputs, timestep=value.to(self.inputs["timestep"].dtype))


def run_variant(model, inputs: dict, options: dict, steps: int, warmup: int) -> dict:
    compiled = torch.compile(model, backend=functools.partial(paracompile_backend, options=options))
    paracompile.reset_cache()
    timesteps = Timesteps(inputs)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled(**timesteps.next_inputs())
        synchronize()
        first_call_s = time.perf_counter() - start
        for _ in range(warmup):
            compiled(**timesteps.next_inputs())
        times = []
        output = None
        for _ in range(steps):
            step_inputs = timesteps.next_inputs()
            synchronize()
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            output = compiled(**step_inputs)[0]
            synchronize()
            times.append(1000 * (time.perf_counter() - start))
    stats = paracompile.cache_stats()
    return dict(
        options={key: value for key, value in options.items() if key != "inductor"},
        first_call_s=round(first_call_s, 1),
        median_ms=round(sorted(times)[len(times) // 2], 3),
        min_ms=round(min(times), 3),
        times_ms=[round(t, 3) for t in times],
        hits=sum(g["hits"] for g in stats),
        misses=sum(g["misses"] for g in stats),
        generations=len(stats),
        explanation=explanations[-1] if explanations else None,
    ), output.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=19, help="double (joint) blocks")
    parser.add_argument("--single-blocks", type=int, default=38, help="single blocks")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the first, per variant")
    parser.add_argument("--variants", nargs="+", default=["plain", "miss", "hit"], choices=["plain", "miss", "hit"])
    parser.add_argument("--workload", choices=["flux", "wan"], default="flux",
                        help="wan: Wan2.1 1.3B at 480x832x81 (benchmarks/compare.py's workload); --blocks sets its "
                             "block count, the FLUX size options do not apply")
    parser.add_argument("--compile-blocks", action="store_true", help="compile_blocks=True in every variant")
    parser.add_argument("--methods", nargs="+", default=["fbcache"], choices=list(METHODS))
    parser.add_argument("--mode", default=None, help="Inductor mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, fp32 on CPU: a dry run of the script")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        args.resolution, args.text_tokens = min(args.resolution, 128), min(args.text_tokens, 16)
    if args.workload == "flux":
        config = flux_config(args)
        torch.manual_seed(0)
        with torch.device(device):
            model = FluxTransformer2DModel(**config).to(dtype).eval()
        for parameter in model.parameters():  # keeps activations finite with random weights
            parameter.data.mul_(0.5)
        inputs = flux_inputs(args.resolution, args.text_tokens, config, device, dtype)
    else:
        from compare import build_inputs, build_model, workload_spec  # benchmarks/ is sys.path[0]

        spec = workload_spec("wan", args.tiny, str(args.blocks) if args.blocks != 19 else None)
        config = spec["config"]
        model = build_model(spec, device, dtype)
        inputs = build_inputs(spec, device, dtype)
        args.resolution, args.text_tokens = None, spec["text_tokens"]

    base = {"mesh": {"ulysses": world_size}}
    if args.compile_blocks:
        base["compile_blocks"] = True
    if args.mode is not None:
        base["mode"] = args.mode
    if not cuda:
        base["inductor"] = {"cpp.vec_isa_ok": False}  # compiles faster; the dry run is about the script
    thresholds = {"plain": 0.0, "miss": MISS_THRESHOLD, "hit": HIT_THRESHOLD}
    variants = {name: dict(base, threshold=thresholds[name]) for name in args.variants}
    for method in args.methods:
        if method == "fbcache":
            continue
        for kind in ("miss", "hit"):
            if kind in args.variants:
                variants[f"{kind}:{method}"] = dict(base, threshold=thresholds[kind], **METHODS[method],
                                                    **({"fbcache_warmup": 2} if kind == "hit" else {}))
    if "hit" in variants:
        variants["hit"]["fbcache_warmup"] = 2
    results, outputs = {}, {}
    for name, options in variants.items():
        torch._dynamo.reset()
        results[name], outputs[name] = run_variant(model, inputs, options, args.steps, args.warmup)
        if rank == 0:
            print(f"{name}: median {results[name]['median_ms']} ms, hits {results[name]['hits']}, "
                  f"misses {results[name]['misses']}", flush=True)
    reference = outputs.get("plain")
    for name, output in outputs.items():
        if reference is not None:
            results[name]["vs_plain_max_abs"] = (output - reference).abs().max().item()
            results[name]["vs_plain_mean_abs"] = (output - reference).abs().mean().item()
    summary = {}
    if "hit" in results and "miss" in results:
        summary["hit_over_miss_speedup"] = round(results["miss"]["median_ms"] / results["hit"]["median_ms"], 2)
    if "miss" in results and "plain" in results:
        summary["miss_overhead_ms"] = round(results["miss"]["median_ms"] - results["plain"]["median_ms"], 3)
    for name in results:
        if name.startswith("hit:") and "plain" in results:
            summary[f"plain_over_{name}"] = round(results["plain"]["median_ms"] / results[name]["median_ms"], 2)

    if rank == 0:
        report = dict(
            device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world_size,
            torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
            command=" ".join(shlex.quote(a) for a in sys.argv), config=config, dtype=str(dtype), workload=args.workload,
            resolution=args.resolution, text_tokens=args.text_tokens,
            image_tokens=(args.resolution // 16) ** 2 if args.resolution else spec["tokens"],
            steps=args.steps, warmup=args.warmup, summary=summary, variants=results,
        )
        print(json.dumps(summary))
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(report, handle, indent=2)
            with open(args.out.removesuffix(".json") + ".md", "w") as handle:
                handle.write(markdown(report) + "\n")
    dist.destroy_process_group()


def markdown(report: dict) -> str:
    lines = [f"# Block cache step time: forced hit against forced miss, {report['workload']}, world size "
             f"{report['world_size']}", "",
             f"- device: {report['device']}, torch {report['torch']}, {report['dtype']}, {report['date']}",
             f"- command: `{report['command']}`",
             f"- {report['image_tokens']} image/video tokens + {report['text_tokens']} text tokens; "
             f"{report['steps']} timed calls per variant after {report['warmup']} untimed ones; hit variants run with "
             "fbcache_warmup 2", "",
             "| variant | options | median ms / call | min ms | hits / misses counted | max abs vs plain |",
             "|---|---|---|---|---|---|"]
    for name, result in report["variants"].items():
        options = {k: v for k, v in result["options"].items() if k not in ("mesh",)}
        lines.append(f"| {name} | `{options}` | {result['median_ms']:.2f} | {result['min_ms']:.2f} | "
                     f"{result['hits']} / {result['misses']} | {result.get('vs_plain_max_abs', float('nan')):.3g} |")
    lines += ["", "summary: `" + json.dumps(report["summary"]) + "`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
