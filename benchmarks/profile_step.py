"""Profiles one compiled step of a FLUX-shaped transformer under paracompile and prints where GPU time goes.

    torchrun --nproc_per_node=2 benchmarks/profile_step.py --double 19 --single 38 --out profile.txt

Kernels are grouped into communication (NCCL), attention, matrix products, and the rest (Inductor's fused
elementwise and copy kernels), from rank 0's profile of a few steps after warm-up.
"""
from __future__ import annotations

import argparse
import collections

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import paracompile
from benchmarks.gpu_check import flux_inputs
from diffusers import FluxTransformer2DModel


def category(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "communication (nccl)"
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered or "cudnn" in lowered and "sdpa" in lowered:
        return "attention"
    if "gemm" in lowered or "sm90" in lowered or "cutlass" in lowered or "matmul" in lowered:
        return "matrix products"
    if lowered.startswith("triton"):
        return "inductor fused kernels"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    config = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    compiled = torch.compile(model, backend=paracompile.paracompile_backend, options={"mesh": {"ulysses": world_size}})
    inputs = flux_inputs(args.resolution, 512, config, device, torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            compiled(**inputs)
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(args.steps):
                compiled(**inputs)
            torch.cuda.synchronize()
    if rank == 0:
        totals = collections.Counter()
        for event in profiler.key_averages():
            totals[category(event.key)] += event.device_time_total / 1000 / args.steps
        lines = [f"GPU time per step by kind (rank 0, {args.steps} steps):"]
        lines += [f"  {kind:28s} {ms:8.2f} ms" for kind, ms in totals.most_common()]
        lines.append(f"  {'sum':28s} {sum(totals.values()):8.2f} ms")
        lines.append(profiler.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=90))
        text = "\n".join(lines)
        print(text)
        if args.out:
            open(args.out, "w").write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
