"""GPU correctness check: a FLUX-shaped transformer with a few blocks, bf16, paracompile Ulysses on NCCL,
against the same model on one GPU (eager and Inductor), on every rank.

    torchrun --nproc_per_node=2 benchmarks/gpu_check.py --double 2 --single 4 --out results.json

Each rank builds the same model and inputs (seeded) and computes the single-GPU references itself, so the
comparison needs no communication. Besides the errors it prints per-step times of this small model, which
say little about full-size speed (see benchmarks/README for those).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

import paracompile
from paracompile.backend import explanations


def flux_inputs(resolution: int, text_tokens: int, config: dict, device, dtype) -> dict:
    side = resolution // 16
    generator = torch.Generator(device=device).manual_seed(1)
    image_ids = torch.zeros(side * side, 3, device=device, dtype=dtype)
    rows = torch.arange(side, device=device)
    image_ids[:, 1] = rows.repeat_interleave(side).to(dtype)
    image_ids[:, 2] = rows.repeat(side).to(dtype)
    return dict(
        hidden_states=torch.randn(1, side * side, config["in_channels"], device=device, dtype=dtype, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype,
                                          generator=generator),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=generator),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=image_ids,
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(function, steps: int) -> float:
    times = []
    for _ in range(steps):
        synchronize()
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        function()
        synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 1008])
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, for a dry run on a CPU")
    parser.add_argument("--mesh", type=json.loads, default=None,
                        help='paracompile mesh as JSON, e.g. \'{"ring": 2}\' (default: Ulysses over all ranks)')
    parser.add_argument("--dump-code", default=None,
                        help="write the code Inductor generated for paracompile's graph to this file (rank 0)")
    parser.add_argument("--inductor-patches", type=json.loads, nargs="*", default=[],
                        help="extra paracompile runs, each with these Inductor config patches (JSON dicts)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = dict(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    if args.tiny:  # a dry run of this script on a CPU
        config.update(in_channels=16, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                      pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    for parameter in model.parameters():  # keeps activations finite with random weights
        parameter.data.mul_(0.5)

    inductor_model = torch.compile(model)
    mesh = args.mesh or {"ulysses": world_size}
    parallel_model = torch.compile(model, backend=paracompile.paracompile_backend, options={"mesh": mesh})
    variants = [(patches, torch.compile(model, backend=paracompile.paracompile_backend,
                                        options={"mesh": mesh, "inductor": patches}))
                for patches in args.inductor_patches]
    results = []
    for resolution in args.resolutions:
        inputs = flux_inputs(resolution, args.text_tokens, config, device, dtype)
        with torch.inference_mode():
            eager = model(**inputs)[0].float()
            start = time.perf_counter()
            inductor = inductor_model(**inputs)[0].float()
            inductor_compile_s = time.perf_counter() - start
            start = time.perf_counter()
            if args.dump_code and resolution == args.resolutions[0]:
                from torch._inductor.utils import run_and_get_code

                parallel, codes = run_and_get_code(lambda: parallel_model(**inputs)[0].float())
                if rank == 0:
                    with open(args.dump_code, "w") as file:
                        file.write("\n\n# ---- next graph ----\n\n".join(codes))
            else:
                parallel = parallel_model(**inputs)[0].float()
            parallel_compile_s = time.perf_counter() - start
            scale = eager.abs().max().item()
            row = dict(
                resolution=resolution,
                mesh=mesh,
                image_tokens=(resolution // 16) ** 2,
                text_tokens=args.text_tokens,
                output_max_abs=scale,
                paracompile_vs_eager_max_abs=(parallel - eager).abs().max().item(),
                paracompile_vs_eager_mean_abs=(parallel - eager).abs().mean().item(),
                inductor_vs_eager_max_abs=(inductor - eager).abs().max().item(),
                inductor_vs_eager_mean_abs=(inductor - eager).abs().mean().item(),
                paracompile_vs_inductor_max_abs=(parallel - inductor).abs().max().item(),
                inductor_first_call_s=round(inductor_compile_s, 1),
                paracompile_first_call_s=round(parallel_compile_s, 1),
                eager_ms=median_ms(lambda: model(**inputs), args.steps),
                inductor_ms=median_ms(lambda: inductor_model(**inputs), args.steps),
                paracompile_ms=median_ms(lambda: parallel_model(**inputs), args.steps),
            )
            for patches, variant in variants:
                start = time.perf_counter()
                variant_output = variant(**inputs)[0].float()
                row.setdefault("variants", []).append(dict(
                    inductor_patches=patches, first_call_s=round(time.perf_counter() - start, 1),
                    vs_eager_max_abs=(variant_output - eager).abs().max().item(),
                    ms=median_ms(lambda: variant(**inputs), args.steps)))
        gathered = [None] * world_size
        dist.all_gather_object(gathered, row)
        if rank == 0:
            for other_rank, other in enumerate(gathered):
                print(f"rank {other_rank}: " + json.dumps(other), flush=True)
            results.append(dict(per_rank=gathered))
    if rank == 0:
        report = dict(
            device=torch.cuda.get_device_name(device) if cuda else "cpu", world_size=world_size, torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"), config=config, dtype=str(dtype), results=results,
            explanation=explanations[-1] if explanations else None,
        )
        print(report["explanation"])
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(report, handle, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
