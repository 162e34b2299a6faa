"""Can one CUDA graph hold First Block Cache's whole step, the decision included? Probes, on this GPU, what
a conditional node's body (CUDAGraph.begin_capture_to_if_node) may contain: cuBLAS matmuls, copies,
index_copy_, allocations from the graph's pool, an Inductor-compiled function, and NCCL collectives (a
one-rank NCCL group: its kernels and copies are captured as they would be on more ranks). Each probe
captures once and replays with the predicate true and false, checking the outputs.

    python benchmarks/conditional_graph_probe.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.distributed as dist


def if_node(graph: torch.cuda.CUDAGraph, pred: torch.Tensor):
    class _Body:
        def __enter__(self):
            graph.begin_capture_to_if_node(pred)

        def __exit__(self, *exc):
            graph.end_capture_to_conditional_node()

    return _Body()


def probe(name: str, body, results: dict) -> None:
    """`body(pred, out)` writes into `out` under if(pred); replays with pred 1 and 0."""
    try:
        pred = torch.zeros((), dtype=torch.bool, device="cuda")
        out = torch.zeros(64, 64, device="cuda")
        body(pred, out, warm=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out.zero_()
            with if_node(graph, pred):
                body(pred, out, warm=False)
        checks = []
        for value in (True, False, True):
            pred.fill_(value)
            graph.replay()
            torch.cuda.synchronize()
            checks.append(bool(out.abs().sum() > 0) == value)
        results[name] = "ok" if all(checks) else f"wrong result {checks}"
    except Exception as error:  # noqa: BLE001 (the probe reports every failure)
        results[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        traceback.print_exc()
    print(f"{name}: {results[name]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {"begin_capture_to_if_node": hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"),
               "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()}
    a = torch.randn(64, 64, device="cuda")
    b = torch.randn(64, 64, device="cuda")

    probe("elementwise", lambda pred, out, warm: out.add_(a * 2 + 1), results)
    probe("matmul (cuBLAS)", lambda pred, out, warm: out.copy_(a @ b), results)
    probe("bf16 matmul", lambda pred, out, warm: out.copy_((a.bfloat16() @ b.bfloat16()).float()), results)
    probe("copy_ (memcpy)", lambda pred, out, warm: out.copy_(a), results)
    store = torch.zeros(2, 64, 64, device="cuda")
    index = torch.ones(1, dtype=torch.long, device="cuda")

    def indexed(pred, out, warm):
        store.index_copy_(0, index, (a + 1).unsqueeze(0))
        out.copy_(store.index_select(0, index)[0])
    probe("index_copy_/index_select", indexed, results)

    def allocating(pred, out, warm):
        scratch = torch.empty(4096, 64, device="cuda")
        scratch.fill_(1.0)
        out.copy_(scratch[:64])
    probe("allocation in the body", allocating, results)

    compiled = torch.compile(lambda x, y: torch.nn.functional.gelu(x @ y) + x.sum(-1, keepdim=True))

    def inductor(pred, out, warm):
        out.copy_(compiled(a, b))
    probe("Inductor-compiled function", inductor, results)

    scaled = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)

    def attention(pred, out, warm):
        result = torch.nn.functional.scaled_dot_product_attention(scaled, scaled, scaled)
        out.copy_(result.float().reshape(-1)[:4096].reshape(64, 64) + 1)
    probe("scaled_dot_product_attention", attention, results)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    warm_gather = torch.empty(64, 64, device="cuda")
    dist.all_gather_into_tensor(warm_gather, a)
    dist.all_to_all_single(torch.empty_like(a), a)

    def gather(pred, out, warm):
        dist.all_gather_into_tensor(out, a + 1)
    probe("NCCL all_gather (1 rank)", gather, results)

    def all_to_all(pred, out, warm):
        dist.all_to_all_single(out, a + 1)
    probe("NCCL all_to_all_single (1 rank)", all_to_all, results)

    functional = torch.ops._c10d_functional
    group_name = dist.group.WORLD.group_name

    def functional_all_to_all(pred, out, warm):
        exchanged = functional.all_to_all_single(a + 1, [64], [64], group_name)
        out.copy_(functional.wait_tensor(exchanged))
    probe("functional all_to_all_single (1 rank)", functional_all_to_all, results)
    dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
