"""How fast one Ulysses exchange moves, and whether it can run under a matrix product, on this host's GPUs.

    torchrun --nproc_per_node=2 benchmarks/a2a_probe.py --out DIR

Sizes are FLUX.1-dev's at 1024x1024 on 2 ranks: q, k and v stacked (3 x 24 heads x 2304 local tokens x 128,
bf16, 42.5 MB per rank, half of it sent) and the attention output (14.2 MB per rank). For each size:

- nccl: `all_to_all_single` alone;
- nccl + mm: the same on a side stream while the compute stream runs a 2304x3072x12288 product (the size of a
  FLUX single block's MLP projection), against the product alone: how much the two slow each other;
- ce: the same exchange through symmetric memory, the peer's slot written by a device-to-device copy (the
  copy engine, no SMs), between two barriers; alone and under the product.

Times are CUDA-event medians of 30 calls after 5 warm-up calls, on every rank; rank 0 writes the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def timed(fn, streams, repeat: int = 30, warmup: int = 5) -> float:
    """Median ms of fn() between a barrier-synchronised start and the end of every stream's work."""
    times = []
    for i in range(warmup + repeat):
        torch.cuda.synchronize()
        dist.barrier()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        fn()
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dtype = torch.bfloat16
    sizes = {"qkv (3x24x2304x128)": 3 * 24 * 2304 * 128, "output (24x2304x128)": 24 * 2304 * 128}
    a = torch.randn(2304, 3072, device=device, dtype=dtype)
    b = torch.randn(3072, 12288, device=device, dtype=dtype)
    side = torch.cuda.Stream(device)

    def matmul():
        torch.mm(a, b)

    rows = []
    mm_alone = timed(matmul, [])
    rows.append({"what": "mm 2304x3072x12288 alone", "ms": round(mm_alone, 4)})

    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        largest = max(sizes.values())
        buffer = symm_mem.empty(world * largest, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)
        symm = (buffer, handle)
    except Exception as error:  # noqa: BLE001 - reported, not fatal: the NCCL rows still run
        rows.append({"what": "symmetric memory", "error": f"{type(error).__name__}: {error}"})

    for label, numel in sizes.items():
        send = torch.randn(world * (numel // world), device=device, dtype=dtype)
        receive = torch.empty_like(send)
        sent_bytes = send.numel() * send.element_size() * (world - 1) / world

        def nccl():
            dist.all_to_all_single(receive, send)

        def nccl_under_mm():
            with torch.cuda.stream(side):
                dist.all_to_all_single(receive, send)
            matmul()

        t = timed(nccl, [])
        rows.append({"what": f"nccl all_to_all {label}", "ms": round(t, 4), "GB/s sent": round(sent_bytes / t / 1e6, 1)})
        t = timed(nccl_under_mm, [side])
        rows.append({"what": f"nccl all_to_all {label} + mm concurrently", "ms": round(t, 4)})
        if symm is not None:
            buffer, handle = symm
            piece = numel // world

            def ce_exchange(stream=None):
                # slot `rank` of every peer's buffer receives what this rank sends it
                handle.barrier(channel=0)  # the peer no longer reads its buffer
                for peer in range(world):
                    target = handle.get_buffer(peer, (world * piece,), dtype) if peer != rank else buffer
                    target[rank * piece:(rank + 1) * piece].copy_(send[peer * piece:(peer + 1) * piece])
                handle.barrier(channel=1)  # every peer's writes into this buffer are done

            def ce_under_mm():
                with torch.cuda.stream(side):
                    ce_exchange()
                matmul()

            try:
                t = timed(ce_exchange, [])
                expected = torch.cat([torch.full((piece,), float(r), device=device) for r in range(world)])
                marker = torch.full_like(send, float(rank))
                send.copy_(marker)
                ce_exchange()
                torch.cuda.synchronize()
                ok = torch.equal(buffer[:world * piece].float(), expected)
                rows.append({"what": f"copy-engine exchange {label}", "ms": round(t, 4),
                             "GB/s sent": round(sent_bytes / t / 1e6, 1), "correct": ok})
                t = timed(ce_under_mm, [side])
                rows.append({"what": f"copy-engine exchange {label} + mm concurrently", "ms": round(t, 4)})
            except Exception as error:  # noqa: BLE001
                rows.append({"what": f"copy-engine exchange {label}", "error": f"{type(error).__name__}: {error}"})

    if rank == 0:
        props = torch.cuda.get_device_properties(device)
        result = {"device": f"{world}x {props.name}", "torch": torch.__version__,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())), "rows": rows}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "a2a_probe.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
