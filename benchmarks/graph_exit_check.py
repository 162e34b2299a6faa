"""Does a process whose compiled step holds CUDA graphs with NCCL collectives shut down cleanly?

    torchrun --nproc_per_node=2 benchmarks/graph_exit_check.py            # paracompile's destroy path
    torchrun --nproc_per_node=2 benchmarks/graph_exit_check.py --control  # torch's destroy, graphs alive

A small attention model is compiled with {"mesh": {"ulysses": world}, "cuda_graphs": True}, called four
times (eager, capture, two replays; each output compared with the eager model's on this rank), then the
script calls `torch.distributed.destroy_process_group()` and prints how long it took. NCCL does not
destroy a communicator while a graph that captured one of its collectives is alive (pytorch#115388), so
with `--control` (torch's own destroy, saved before paracompile wraps it) the destroy is expected to hang;
run it under `timeout`. Prints `PASS` or `FAIL` lines.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.distributed_c10d import destroy_process_group as torch_destroy_process_group


class Attention(torch.nn.Module):
    def __init__(self, width: int = 256, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, width)) + x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--control", action="store_true", help="destroy with torch's own function (graphs alive)")
    args = parser.parse_args()
    from paracompile import paracompile_backend
    from paracompile.cuda_graphs import CudaGraphStep

    cuda = torch.cuda.is_available()  # without CUDA: a dry run of the script on gloo (no graphs to hold)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Attention().to(device, dtype)
    options = {"mesh": {"ulysses": world}, "cuda_graphs": cuda, "compiler": "inductor" if cuda else "eager"}
    compiled = torch.compile(model, backend=lambda gm, example: paracompile_backend(gm, example, options=options))
    with torch.inference_mode():
        for call in range(4):
            x = torch.randn(2, 64 * world, 256, generator=torch.Generator().manual_seed(call)).to(device, dtype)
            difference = (compiled(x) - model(x)).abs().max().item()
            print(f"rank {rank}: {'PASS' if difference < 0.05 else 'FAIL'} call {call}: max abs diff {difference:.4f}",
                  flush=True)
    held = sum(len(step.graphs) for step in CudaGraphStep.live)
    print(f"rank {rank}: {'PASS' if held else 'FAIL'} graphs held before destroy: {held}", flush=True)
    start = time.perf_counter()
    (torch_destroy_process_group if args.control else dist.destroy_process_group)()
    print(f"rank {rank}: PASS destroy_process_group returned in {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
