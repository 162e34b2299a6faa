"""paracompile quickstart: sample digits three ways and check that context parallelism changes nothing.

    torchrun --nproc_per_node=2 examples/quickstart.py --out out     # 2 processes (CPU: gloo, GPU: NCCL)
    python examples/quickstart.py --out out                          # 1 process works too

The model is a tiny FLUX transformer (diffusers' `FluxTransformer2DModel`, 10 blocks) trained on scikit-learn's
8x8 digits by `train_digits.py`; its weights are in `digits_dit/`. Every rank builds the same model and the same
noise, and samples one grid of digits (10 classes x `--per-class`) with `--steps` Euler steps of the flow:

1. eager: the plain model, on every rank (the reference);
2. paracompile: `torch.compile(transformer, backend="paracompile", options={"mesh": {"ulysses": world_size}})`,
   the model split over the ranks along the tokens, Ulysses attention;
3. paracompile + First Block Cache: the same with `"threshold": --threshold`; steps whose first block barely
   changed skip the other blocks.

Rank 0 writes `OUT/quickstart.png` (the three grids side by side) and prints the time per step, the cache's hit
ratio and the largest difference to the eager samples. The exit status is 1 when the context-parallel samples
differ from eager by more than `--tolerance` (the cached ones are approximate by design and only reported).

`--compiler` picks what runs the rewritten graph: "eager" (the default on CPU: no Inductor compile, which
takes tens of seconds on a small CPU) or "inductor" (the default on CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import paracompile
import digits_model as digits


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def sample(name: str, model, label_encoder, labels, noise, steps: int, show: bool) -> tuple[torch.Tensor, float]:
    """Samples one grid; returns the images and the seconds per step."""
    with tqdm(total=steps, desc=f"{name:>22}", disable=not show, leave=True, file=sys.stdout) as bar:
        synchronize()
        start = time.perf_counter()
        images = digits.sample(model, label_encoder, labels, noise, steps, on_step=lambda _: bar.update())
        synchronize()
        return images, (time.perf_counter() - start) / steps


def first_call(model, label_encoder, labels, noise) -> float:
    """One call at the sampling shapes, which compiles; returns its seconds."""
    synchronize()
    start = time.perf_counter()
    digits.sample(model, label_encoder, labels, noise, steps=1)
    synchronize()
    return time.perf_counter() - start


def side_by_side(grids: list, titles: list[str]):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    title_height, gap = 28, 16
    width = sum(grid.width for grid in grids) + gap * (len(grids) + 1)
    height = max(grid.height for grid in grids) + title_height + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = gap
    for grid, title in zip(grids, titles):
        draw.text((x, 6), title, fill=(0, 0, 0), font=font)
        canvas.paste(grid.convert("RGB"), (x, title_height))
        x += grid.width + gap
    return canvas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for quickstart.png")
    parser.add_argument("--steps", type=int, default=28, help="Euler steps of the flow")
    parser.add_argument("--per-class", type=int, default=3, help="samples of each digit")
    parser.add_argument("--threshold", type=float, default=0.12,
                        help="First Block Cache threshold (benchmarks/fbcache_sweep.py measures others)")
    parser.add_argument("--compiler", choices=["eager", "inductor"], default=None,
                        help="what runs the rewritten graph (default: inductor on CUDA, eager on CPU)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest allowed |paracompile - eager| (pixels in [-1, 1])")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    compiler = args.compiler or ("inductor" if cuda else "eager")
    show = rank == 0
    if show:
        print(f"world size {world_size} ({'NCCL' if cuda else 'gloo' if world_size > 1 else 'one process'}), "
              f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, compiler {compiler!r}, "
              f"torch {torch.__version__}")

    transformer, label_encoder = digits.load(device=device)
    labels = torch.arange(digits.NUM_CLASSES, device=device).repeat(args.per_class)  # a row of 0-9 per sample
    noise = torch.randn(len(labels), 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)

    # 1. Eager, on every rank.
    eager, eager_step = sample("eager", transformer, label_encoder, labels, noise, args.steps, show)

    # 2. Context parallel: the model's tokens split over all ranks.
    mesh = {"ulysses": world_size}
    parallel_model = torch.compile(transformer, backend="paracompile", options={"mesh": mesh, "compiler": compiler})
    parallel_compile = first_call(parallel_model, label_encoder, labels, noise)
    parallel, parallel_step = sample("paracompile", parallel_model, label_encoder, labels, noise, args.steps, show)

    # 3. Context parallel with First Block Cache.
    torch._dynamo.reset()  # a fresh compile of the same model with other options
    cached_model = torch.compile(transformer, backend="paracompile",
                                 options={"mesh": mesh, "compiler": compiler, "threshold": args.threshold})
    cached_compile = first_call(cached_model, label_encoder, labels, noise)
    paracompile.reset_cache()  # forget the compile call's generation: the sampling loop starts afresh
    cached, cached_step = sample("paracompile + FBCache", cached_model, label_encoder, labels, noise, args.steps, show)
    stats = paracompile.cache_stats()
    hits, calls = sum(s["hits"] for s in stats), sum(s["hits"] + s["misses"] for s in stats)

    # Every rank has the full output; take the worst rank's difference.
    errors = torch.tensor([(parallel - eager).abs().max().item(), (cached - eager).abs().max().item(),
                           (cached - eager).abs().mean().item()], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    parallel_error, cached_error, cached_mean_error = errors.tolist()
    passed = parallel_error <= args.tolerance

    if show:
        print(f"\n{'':24}{'ms/step':>9}{'speedup':>9}{'first call (compile)':>23}")
        print(f"{'eager':<24}{1000 * eager_step:9.1f}{1.0:8.2f}x")
        parallel_name = f"paracompile ulysses {world_size}" if world_size > 1 else "paracompile (1 process)"
        for name, step, compile_s in [(parallel_name, parallel_step, parallel_compile),
                                      ("paracompile + FBCache", cached_step, cached_compile)]:
            print(f"{name:<24}{1000 * step:9.1f}{eager_step / step:8.2f}x{compile_s:21.1f} s")
        print(f"\nFirst Block Cache, threshold {args.threshold}: {hits}/{calls} steps hit "
              f"({100 * hits / max(calls, 1):.0f}%); |cached - eager| max {cached_error:.4f}, "
              f"mean {cached_mean_error:.5f} (approximate by design)")
        print(f"|paracompile - eager| max {parallel_error:.2e}, tolerance {args.tolerance:g}: "
              f"{'OK' if passed else 'FAILED'}")
        args.out.mkdir(parents=True, exist_ok=True)
        grids = [digits.to_grid(images, columns=digits.NUM_CLASSES) for images in (eager, parallel, cached)]
        titles = ["eager", f"paracompile (ulysses {world_size})" if world_size > 1 else "paracompile (1 process)",
                  f"+ FBCache {args.threshold:g} ({100 * hits / max(calls, 1):.0f}% hits)"]
        side_by_side(grids, titles).save(args.out / "quickstart.png")
        print(f"wrote {args.out / 'quickstart.png'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
