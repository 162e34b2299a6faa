"""Do NCCL collectives (the functional collectives paracompile's graphs use) work inside CUDA graphs, and
does a capture execute nothing, so that one rank may capture while the others run eagerly?

    torchrun --nproc_per_node=2 benchmarks/nccl_graph_probe.py

Each check prints `PASS name` or `FAIL name: why`; the process group has a 60 s timeout, so a hang shows
as a failure rather than as a stuck run.

1. replay: every rank captures a step (all_to_all_single, wait, arithmetic around it) and replays it three
   times with new inputs copied into the graph's input buffer; each result must equal the eager step's.
2. capture_while_others_run: rank 0 captures a second graph (executing nothing) and then replays it, while
   the other ranks run the step eagerly once; the results must match (a capture that executed the
   collective would leave the ranks one collective apart, and the next step would hang or mix data).
3. after: one more eager step on every rank still matches, so the ranks are still in step.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def step(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    chunk = x.shape[0] // world
    exchanged = torch.ops._c10d_functional.all_to_all_single(x * 2, [chunk] * world, [chunk] * world, group_name)
    return torch.ops._c10d_functional.wait_tensor(exchanged) + 1


def expected(inputs: list[torch.Tensor], rank: int, world: int) -> torch.Tensor:
    chunk = inputs[0].shape[0] // world
    return torch.cat([inputs[source][rank * chunk:(rank + 1) * chunk] * 2 + 1 for source in range(world)])


def main() -> None:
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group_name = dist.group.WORLD.group_name

    def inputs_for(call: int) -> list[torch.Tensor]:
        return [torch.arange(4 * world, device="cuda", dtype=torch.float32) + 1000 * r + 10 * call for r in range(world)]

    def check(name: str, got: torch.Tensor, call: int) -> None:
        want = expected(inputs_for(call), rank, world)
        ok = torch.equal(got, want)
        print(f"rank {rank}: {'PASS' if ok else 'FAIL'} {name}" + ("" if ok else f": {got.tolist()} != {want.tolist()}"),
              flush=True)

    check("eager", step(inputs_for(0)[rank], group_name, world), 0)  # sets up the communicator

    static = inputs_for(0)[rank].clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step(static, group_name, world)
    for call in (1, 2, 3):
        static.copy_(inputs_for(call)[rank])
        graph.replay()
        torch.cuda.synchronize()
        check(f"replay call {call}", out.clone(), call)

    dist.barrier()
    if rank == 0:
        second = torch.cuda.CUDAGraph()
        static2 = inputs_for(4)[rank].clone()
        torch.cuda.synchronize()
        with torch.cuda.graph(second, capture_error_mode="thread_local"):
            out2 = step(static2, group_name, world)
        second.replay()
        torch.cuda.synchronize()
        result = out2.clone()
    else:
        result = step(inputs_for(4)[rank], group_name, world)
        torch.cuda.synchronize()
    check("capture_while_others_run", result, 4)
    check("after", step(inputs_for(5)[rank], group_name, world), 5)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
