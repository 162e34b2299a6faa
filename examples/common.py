"""What the real-model examples (flux.py, wan.py, hunyuan_video.py) share: command line, process group,
compiling the transformer with paracompile, the random-weights timing loop, saving.

Each example is launched the same way:

    torchrun --nproc_per_node=N examples/<model>.py [--ulysses U --ring R --batch B] [--threshold T] ...

Every rank loads the same pipeline and runs it with the same prompt and seed; only the transformer is
compiled with paracompile, so its tokens (and, with `--batch`, its batch rows) are split over the ranks.
Rank 0 saves the result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import paracompile


# ---------------------------------------------------------------------------------------------------
# Command line


def parser(description: str, model: str, height: int, width: int, steps: int, frames: int | None = None):
    """The options every example takes; the defaults are the model's pipeline defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=model, help="a local path or hub id of the diffusers pipeline")
    p.add_argument("--ulysses", type=int, default=None,
                   help="Ulysses degree (default: the world size divided by --ring and --batch)")
    p.add_argument("--ring", type=int, default=1, help="ring attention degree")
    p.add_argument("--batch", type=int, default=1, help="batch-parallel degree (rows of the batch over ranks)")
    p.add_argument("--threshold", type=float, default=0.0, help="First Block Cache threshold (0: off)")
    p.add_argument("--steps", type=int, default=steps, help="denoising steps")
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--width", type=int, default=width)
    if frames is not None:
        p.add_argument("--frames", type=int, default=frames, help="video frames (4k + 1)")
    p.add_argument("--samples", type=int, default=None,
                   help="images or videos per prompt (default: the --batch degree, so each batch rank has one)")
    p.add_argument("--compile-mode", default=None,
                   help="Inductor mode, e.g. max-autotune-no-cudagraphs (passed as paracompile's 'mode' option)")
    p.add_argument("--compiler", choices=["inductor", "eager"], default="inductor",
                   help="'eager' runs the rewritten graph without Inductor (quick dry runs on a CPU)")
    p.add_argument("--no-compile", action="store_true", help="run the plain transformer (a baseline)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the image or video")
    p.add_argument("--explain", action="store_true", help="print paracompile's report of the rewrite")
    group = p.add_argument_group("random weights (speed without downloads)")
    group.add_argument("--random-weights", action="store_true",
                       help="build the transformer from the model's published config with random weights; "
                            "no text encoders or VAE: random embeddings of the right shapes; times the steps")
    group.add_argument("--layers", type=int, default=None, help="with --random-weights: this many blocks of each kind")
    group.add_argument("--tiny", action="store_true",
                       help="with --random-weights: tiny widths too (a dry run of the script on a CPU)")
    group.add_argument("--json", type=Path, default=None, help="with --random-weights: write the timings here")
    return p


# ---------------------------------------------------------------------------------------------------
# Processes, devices, compiling


class Setup:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        if "WORLD_SIZE" in os.environ:  # launched by torchrun
            dist.init_process_group("nccl" if self.cuda else "gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        # bf16 on GPUs, as the models are run; fp32 on CPUs, where bf16 matmuls are slow or missing.
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def print(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def mesh(args, world_size: int) -> dict:
    ulysses = args.ulysses or max(1, world_size // (args.ring * args.batch))
    degrees = {"ulysses": ulysses, "ring": args.ring, "batch": args.batch}
    if ulysses * args.ring * args.batch != world_size:
        raise SystemExit(f"--ulysses {ulysses} x --ring {args.ring} x --batch {args.batch} must equal the "
                         f"world size {world_size}")
    return degrees


def compile_transformer(transformer, args, setup: Setup):
    """The one line this project is about, with the options the command line gave."""
    if args.no_compile:
        setup.print("transformer: not compiled (--no-compile), replicated on every rank")
        return transformer
    options = {"mesh": mesh(args, setup.world_size), "compiler": args.compiler, "threshold": args.threshold,
               "explain": args.explain}
    if args.compile_mode:
        options["mode"] = args.compile_mode
    setup.print(f"transformer: torch.compile(backend='paracompile', options={options})")
    return torch.compile(transformer, backend="paracompile", options=options)


def samples_per_prompt(args) -> int:
    return args.samples or args.batch


def cache_summary() -> str:
    stats = paracompile.cache_stats()
    hits, calls = sum(s["hits"] for s in stats), sum(s["hits"] + s["misses"] for s in stats)
    return f"First Block Cache: {hits}/{calls} transformer calls hit ({100 * hits / max(calls, 1):.0f}%)"


def time_pipeline(generate: Callable, args, setup: Setup):
    """Real weights: runs `generate(steps, on_step)` (a pipeline call) twice, two steps to compile, then
    `args.steps` timed steps, printing the median step time and the cache's hit ratio. Returns what the
    timed call returned."""
    start = time.perf_counter()
    generate(2)  # compiles
    setup.print(f"warm-up (compiles), 2 steps: {time.perf_counter() - start:.1f} s")
    paracompile.reset_cache()
    stamps = []

    def on_step(pipeline, i, t, kwargs):
        setup.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    setup.synchronize()
    start = time.perf_counter()
    outputs = generate(args.steps, on_step)
    total = time.perf_counter() - start
    steps_ms = [1000 * (b - a) for a, b in zip([start] + stamps[:-1], stamps)]
    setup.print(f"{args.steps} steps in {total:.1f} s (with text encoding and VAE decode); "
                f"per step: median {sorted(steps_ms)[len(steps_ms) // 2]:.1f} ms")
    if args.threshold > 0:
        setup.print(cache_summary())
    return outputs


# ---------------------------------------------------------------------------------------------------
# Random weights


def random_transformer(model_class, config: dict, setup: Setup):
    """The transformer with random weights, built directly on the device in its dtype (a 14B model in fp32
    would not fit one GPU). Weights are scaled down so that activations stay finite through many blocks."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(setup.dtype)
    try:
        torch.manual_seed(0)  # the same weights on every rank
        with torch.device(setup.device):
            transformer = model_class(**config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.mul_(0.5)
    count = sum(p.numel() for p in transformer.parameters())
    setup.print(f"random weights: {model_class.__name__}, {count / 1e6:,.1f}M parameters, {setup.dtype}")
    return transformer.eval().requires_grad_(False)


def shrink(config: dict, args, layer_keys: tuple, tiny: dict) -> dict:
    """The published config, with --layers blocks of each kind and, with --tiny, tiny widths."""
    config = dict(config)
    if args.layers is not None:
        config.update({key: args.layers for key in layer_keys})
    if args.tiny:
        config.update(tiny)
    return config


def time_denoising(transformer: Callable, step_calls: Callable[[torch.Tensor, float], list[dict]],
                   latents: torch.Tensor, args, setup: Setup) -> dict:
    """Runs `args.steps` Euler steps of a flow from t = 1 to t = 0 (what the pipelines' schedulers do, without
    their timestep shift), timing each step. `step_calls(latents, t)` gives the keyword arguments of the
    transformer calls of one step (two with classifier-free guidance); their predictions are averaged."""
    times = torch.linspace(1.0, 0.0, args.steps + 1).tolist()
    step_ms = []
    with torch.no_grad():
        # The first call compiles (and may recompile once); it is timed on its own.
        setup.synchronize()
        start = time.perf_counter()
        for kwargs in step_calls(latents, times[0]):
            transformer(**kwargs)
        setup.synchronize()
        first_call_s = time.perf_counter() - start
        setup.print(f"first step (compiles): {first_call_s:.1f} s")
        paracompile.reset_cache()
        for i in range(args.steps):
            if dist.is_initialized():
                dist.barrier()
            setup.synchronize()
            start = time.perf_counter()
            outputs = [transformer(**kwargs)[0] for kwargs in step_calls(latents, times[i])]
            velocity = sum(outputs) / len(outputs)
            latents = latents + (times[i + 1] - times[i]) * velocity.to(latents.dtype)
            setup.synchronize()
            step_ms.append(1000 * (time.perf_counter() - start))
            setup.print(f"step {i + 1:3d}/{args.steps}: {step_ms[-1]:9.1f} ms")
    result = dict(first_step_s=round(first_call_s, 2), step_ms=[round(ms, 2) for ms in step_ms],
                  median_step_ms=round(statistics.median(step_ms), 2),
                  mean_step_ms=round(statistics.fmean(step_ms), 2),
                  finite=bool(torch.isfinite(latents).all()))
    setup.print(f"per step: median {result['median_step_ms']:.1f} ms, mean {result['mean_step_ms']:.1f} ms "
                f"over {args.steps} steps ({len(step_calls(latents, 0.5))} transformer call(s) per step)")
    if args.threshold > 0:
        setup.print(cache_summary() + " (random weights: not a measure of quality or of real hit ratios)")
    return result


def write_json(args, setup: Setup, config: dict, result: dict) -> None:
    if setup.rank != 0 or args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        model=args.model, config=config, world_size=setup.world_size, mesh=None if args.no_compile else mesh(args, setup.world_size),
        threshold=args.threshold, compiler=args.compiler, compile_mode=args.compile_mode, no_compile=args.no_compile,
        height=args.height, width=args.width, frames=getattr(args, "frames", None), steps=args.steps,
        device=torch.cuda.get_device_name(setup.device) if setup.cuda else "cpu", dtype=str(setup.dtype),
        torch=torch.__version__, date=time.strftime("%Y-%m-%d"), **result)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    setup.print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------------
# Saving (rank 0)


def save_video(frames, path: Path, fps: int) -> Path:
    """An mp4 through diffusers' export_to_video (needs imageio and imageio-ffmpeg), else an animated GIF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from diffusers.utils import export_to_video

        export_to_video(frames, str(path.with_suffix(".mp4")), fps=fps)
        return path.with_suffix(".mp4")
    except ImportError:
        import numpy as np
        from PIL import Image

        images = [Image.fromarray((np.asarray(f) * 255).round().astype("uint8")) if not isinstance(f, Image.Image)
                  else f for f in frames]
        images[0].save(path.with_suffix(".gif"), save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
        return path.with_suffix(".gif")
