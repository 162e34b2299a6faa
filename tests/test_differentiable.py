"""paracompile's collectives with a backward (paracompile/differentiable.py) as Inductor gets them: the functional
collectives they run, so that its scheduler chains them in graph order on every rank (an opaque op could be
ordered differently on ranks whose shards differ in size). One process, traced with fake tensors."""
from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx


def test_inductor_decomposes_the_collectives_with_a_backward_into_functional_collectives():
    from torch._inductor.decomposition import select_decomp_table

    from paracompile.differentiable import FUNCTIONAL_COLLECTIVES, OPS, show_inductor_functional_collectives

    show_inductor_functional_collectives()
    show_inductor_functional_collectives()  # once per process: a second call changes nothing
    table = select_decomp_table()
    assert all(table.get(op) is run for op, run in FUNCTIONAL_COLLECTIVES.items())

    def exchange(tensor):
        gathered = OPS.all_gather(tensor, 2, "0")
        swapped = OPS.all_to_all(gathered, [4, 4], [4, 4], "0")
        return OPS.reduce_scatter(OPS.all_reduce(swapped, "0"), 2, "0")

    graph = make_fx(exchange, tracing_mode="fake", decomposition_table=table)(torch.randn(4, 3)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    collectives = [target for target in targets if "wait_tensor" not in target]
    assert collectives == ["_c10d_functional.all_gather_into_tensor.default",
                           "_c10d_functional.all_to_all_single.default", "_c10d_functional.all_reduce.default",
                           "_c10d_functional.reduce_scatter_tensor.default"], targets
    assert targets.count("_c10d_functional.wait_tensor.default") == 4, targets
