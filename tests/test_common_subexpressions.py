"""The merge of repeated pure computations (passes/common_subexpressions.py), on graphs traced in one
process: what it merges, what it must leave alone, and that the graph's values do not change."""
from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from paracompile.passes.common_subexpressions import merge_common_subexpressions

aten = torch.ops.aten


def _count(gm, target) -> int:
    return sum(1 for node in gm.graph.nodes if node.target is target)


def _merged(function, *inputs):
    gm = make_fx(function, pre_dispatch=True)(*inputs)
    before = function(*[value.clone() for value in inputs])
    removed = merge_common_subexpressions(gm)
    after = gm(*[value.clone() for value in inputs])
    for want, got in zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    return gm, removed


def test_one_scale_for_three_projections_of_one_activation():
    def three_scales(x, wq, wk, wv):
        outputs = []
        for weight in (wq, wk, wv):
            scale = x.abs().amax() / 448.0
            outputs.append((x / scale) @ weight * scale)
        return tuple(outputs)

    x = torch.randn(2, 6, 8)
    weights = [torch.randn(8, 8) for _ in range(3)]
    gm, removed = _merged(three_scales, x, *weights)
    assert _count(gm, aten.amax.default) == 1 and _count(gm, aten.abs.default) == 1
    assert removed >= 2 * 3  # abs, amax, div (scale) and the division of x, twice each


def test_a_write_between_two_reads_keeps_both():
    def read_write_read(x):
        view = x.view(-1)  # read through a view the write does not return: the same node before and after
        before = view.sum()
        x.add_(1)
        return before * 2, view.sum() * 3  # the sums are not outputs themselves (those are never merged)

    gm, _ = _merged(read_write_read, torch.randn(4))
    assert _count(gm, aten.sum.default) == 2


def test_random_ops_are_never_merged():
    def two_draws(x):
        return torch.rand_like(x) + x, torch.rand_like(x) + x

    gm = make_fx(two_draws, pre_dispatch=True)(torch.randn(3))
    merge_common_subexpressions(gm)
    assert _count(gm, aten.rand_like.default) == 2


def test_arguments_of_different_types_are_different():
    def int_and_float(x):
        return x + 1, x + 1.0, x + True

    gm, removed = _merged(int_and_float, torch.arange(4))
    assert removed == 0, gm.code


def test_returned_values_stay_separate_tensors():
    def twice(x):
        return x * 2, x * 2

    gm, _ = _merged(twice, torch.randn(3))
    first, second = gm(torch.randn(3))
    assert first.data_ptr() != second.data_ptr()


def test_computations_of_different_blocks_stay_in_their_blocks():
    """Each block's silu(temb) stays its own: merged into block 0, the blocks would differ (compile once per
    block compiles block 0 apart) and a value would flow from block to block that the model does not pass."""
    def two_blocks(temb, w0, w1):
        return torch.nn.functional.silu(temb) @ w0, torch.nn.functional.silu(temb) @ w1

    gm = make_fx(two_blocks, pre_dispatch=True)(torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4))
    silus = [node for node in gm.graph.nodes if node.target is aten.silu.default]
    for index, node in enumerate(silus):
        node.meta["nn_module_stack"] = {"blocks": (f"L['self'].blocks[{index}]", torch.nn.Module)}
    assert merge_common_subexpressions(gm) == 0 and _count(gm, aten.silu.default) == 2
    for node in silus:
        node.meta["nn_module_stack"] = {"blocks": ("L['self'].blocks[0]", torch.nn.Module)}
    assert merge_common_subexpressions(gm) == 1 and _count(gm, aten.silu.default) == 1
