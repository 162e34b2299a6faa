"""The explain report's pieces, in one process."""
from __future__ import annotations

import torch
import torch.fx as fx

from paracompile.explain import describe_added_ops

aten = torch.ops.aten
functional = torch.ops._c10d_functional


def _graph(targets):
    graph = fx.Graph()
    value = graph.placeholder("x")
    for target, args in targets:
        value = graph.call_function(target, (value, *args))
    graph.output(value)
    return graph


def test_added_ops_are_counted_by_kind_and_renamed_views_are_not_additions():
    original = _graph([(aten.view.default, ([4, 4],)), (aten.narrow.default, (0, 0, 2)), (aten.relu.default, ())])
    rewritten = _graph([(aten.reshape.default, ([4, 4],)), (aten.slice.Tensor, (0, 0, 2)),
                        (aten.movedim.int, (0, 1)), (functional.all_to_all_single.default, ([1], [1], "0")),
                        (functional.wait_tensor.default, ()), (aten.relu.default, ()),
                        (aten.contiguous.default, ())])
    text = describe_added_ops(original, rewritten)
    assert text == ("ops added by the rewrite: 2 collective (all_to_all_single 1, wait_tensor 1); "
                    "2 other (contiguous 1, movedim 1); the original graph has 3 ops"), text


def test_the_overlap_line_says_which_inductor_passes_run():
    from paracompile.backend import describe_overlap
    from paracompile.options import parse_options

    def line(kinds, inductor=None):
        return describe_overlap(kinds, parse_options({"inductor": inductor or {}}))

    assert line({"ulysses", None}) == (
        "Inductor: compute/communication reordering (reorder_compute_for_overlap, sink_waits, raise_comms); "
        "collectives keep their graph order")
    assert line({"ring"}).startswith("Inductor: compute/communication reordering (sink_waits, raise_comms)")
    assert line({None}).startswith("Inductor: no compute/communication reordering")
    assert line({"ulysses"}, {"reorder_for_compute_comm_overlap": False}) == (
        "Inductor: compute/communication reordering turned off by the 'inductor' option")
    assert "(sink_waits)" in line({"ulysses"}, {"reorder_for_compute_comm_overlap_passes": ["sink_waits"]})
