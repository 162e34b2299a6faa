"""Single rules, the layout arithmetic and the mesh arithmetic, in one process (the fast tier).

Rules are called on one node of a small traced aten graph with a chosen input layout; the layout helpers
run on real tensors in a graph without collectives; the mesh is resolved against torch's fake process
group (`torch.testing._internal.distributed.fake_pg`), which plays one rank of a larger world in this
process.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from paracompile import collectives
from paracompile.collectives import ProcessGroupInfo, SegmentArithmetic
from paracompile.graph_builder import GraphBuilder
from paracompile.passes import sharding_rules
from paracompile.passes.sharding_rules import OpView, rule_for
from paracompile.passes.token_layout import TokenLayout

aten = torch.ops.aten


def _node(function, *example_inputs, target):
    """The first node calling `target` in the aten graph of `function` (pre-dispatch, like the backend's)."""
    graph = make_fx(function, pre_dispatch=True)(*example_inputs).graph
    return next(n for n in graph.nodes if n.op == "call_function" and n.target is target), graph


def _apply(node, layouts: dict):
    """The rule's answer for `node` when the placeholders named in `layouts` have those layouts."""
    by_node = {n: layouts[n.target] for n in node.graph.nodes if n.op == "placeholder" and n.target in layouts}
    return rule_for(node)(OpView(node, by_node.get))


def test_pointwise_follows_the_token_axis_through_broadcasting():
    node, _ = _node(lambda x, bias: x + bias, torch.randn(2, 10, 8), torch.randn(8), target=aten.add.Tensor)
    sharding = _apply(node, {"x_1": TokenLayout(1, (10,))})
    assert sharding.output == TokenLayout(1, (10,))
    assert set(sharding.inputs) == {"self"}, "a bias without the token axis stays replicated"


def test_linear_keeps_the_token_axis_unless_it_contracts_over_it():
    node, _ = _node(lambda x, w: torch.nn.functional.linear(x, w), torch.randn(2, 10, 8), torch.randn(4, 8),
                    target=aten.linear.default)
    assert _apply(node, {"x_1": TokenLayout(1, (10,))}).output == TokenLayout(1, (10,))
    assert _apply(node, {"x_1": TokenLayout(2, (8,))}) is None


def test_reshape_keeps_whole_token_axes_and_declines_an_unpatchify():
    keep, _ = _node(lambda x: x.view(2, 10, 2, 4), torch.randn(2, 10, 8), target=aten.view.default)
    assert _apply(keep, {"x_1": TokenLayout(1, (10,))}).output == TokenLayout(1, (10,))
    split, _ = _node(lambda x: x.view(2, 5, 2, 8), torch.randn(2, 10, 8), target=aten.view.default)
    assert _apply(split, {"x_1": TokenLayout(1, (10,))}) is None


def test_slices_of_the_token_axis_must_fall_on_segment_boundaries():
    at_boundary, _ = _node(lambda x: x[:, 3:], torch.randn(2, 10, 8), target=aten.slice.Tensor)
    assert _apply(at_boundary, {"x_1": TokenLayout(1, (3, 7))}).output == TokenLayout(1, (7,))
    inside, _ = _node(lambda x: x[:, 4:], torch.randn(2, 10, 8), target=aten.slice.Tensor)
    assert _apply(inside, {"x_1": TokenLayout(1, (3, 7))}) is None


def test_cat_along_the_token_axis_appends_segments():
    node, _ = _node(lambda text, image: torch.cat([text, image], dim=1), torch.randn(1, 3, 8),
                    torch.randn(1, 7, 8), target=aten.cat.default)
    sharding = _apply(node, {"text_1": TokenLayout(1, (3,)), "image_1": TokenLayout(1, (7,))})
    assert sharding.output == TokenLayout(1, (3, 7))


def test_pad_sequence_stacks_sequences_split_alike_and_declines_padding_along_the_token_axis():
    """Z-Image stacks each sample's tokens with pad_sequence: with the token axis the padded dim, the
    sequences must all have its length (nothing is padded); a token axis on a trailing dim is never padded."""
    def stacked(a, b, batch_first):
        return _node(lambda x, y: torch.nn.utils.rnn.pad_sequence([x, y], batch_first=batch_first), a, b,
                     target=aten.pad_sequence.default)[0]

    tokens = TokenLayout(0, (10,))
    same = stacked(torch.randn(10, 8), torch.randn(10, 8), batch_first=True)
    sharding = _apply(same, {"x_1": tokens, "y_1": tokens})
    assert sharding.output == TokenLayout(1, (10,)) and sharding.inputs == {"sequences": [tokens, tokens]}
    assert _apply(stacked(torch.randn(10, 8), torch.randn(10, 8), batch_first=False),
                  {"x_1": tokens}).output == TokenLayout(0, (10,))
    assert _apply(stacked(torch.randn(10, 8), torch.randn(7, 8), batch_first=True), {"x_1": tokens}) is None
    trailing = stacked(torch.randn(3, 10), torch.randn(5, 10), batch_first=True)
    assert _apply(trailing, {"x_1": TokenLayout(1, (10,)), "y_1": TokenLayout(1, (10,))}).output == \
        TokenLayout(2, (10,))
    assert _apply(trailing, {"x_1": TokenLayout(1, (10,)), "y_1": TokenLayout(1, (4, 6))}) is None


def test_a_conversion_that_changes_nothing_is_a_true_view_of_its_input():
    """`x.to(x.dtype)` returns x itself, on a full tensor or a shard: an in-place write through it reaches
    x's own storage (CogView4 writes its rotary update into `norm_q(q).to(dtype)`). A conversion that
    changes the dtype copies, so a write through it would be lost."""
    from paracompile.passes.sharding_plan import Aliases

    def convert(x):
        same, other = x.to(torch.float32), x.to(torch.float64)
        same[:, 1:] = 0
        other[:, 1:] = 0
        return same, other

    graph = make_fx(convert, pre_dispatch=True)(torch.randn(2, 3)).graph
    aliases = Aliases()
    conversions = []
    for node in graph.nodes:
        if node.op == "call_function":
            aliases.track(node, lambda parent: True)
            if node.target is aten.to.dtype:
                conversions.append(node)
    same, other = conversions
    assert aliases.root_of(same).target == "x_1" and aliases.is_true_view(same)
    assert not aliases.is_true_view(other)


@pytest.mark.parametrize("function, token_local", [
    (lambda x: x.mean(-1), True), (lambda x: x.var(1), False), (lambda x: x.softmax(-1), True),
    (lambda x: x.softmax(1), False)])
def test_ops_along_the_token_axis_decline(function, token_local):
    graph = make_fx(function, pre_dispatch=True)(torch.randn(2, 10, 8)).graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    sharding = _apply(node, {"x_1": TokenLayout(1, (10,))})
    assert (sharding is not None) == token_local


# ----------------------------------------------------------------------------------------------
# Layout arithmetic


@pytest.mark.parametrize("length, ranks, expected", [(35, 2, [18, 17]), (35, 4, [9, 9, 9, 8]), (6, 4, [2, 2, 2, 0]),
                                                      (2, 4, [1, 1, 0, 0]), (16, 4, [4, 4, 4, 4])])
def test_segments_split_like_torch_chunk(length, ranks, expected):
    builder = GraphBuilder(fx.Graph(), {})
    sizes = SegmentArithmetic(builder, TokenLayout(0, (length,)), ProcessGroupInfo(ranks, 0, "unused"))
    assert [sizes.lengths_of_rank(rank)[0] for rank in range(ranks)] == expected
    assert expected == [len(chunk) for chunk in torch.arange(length).chunk(ranks)] + [0] * (
        ranks - len(torch.arange(length).chunk(ranks)))


def _run(build, *inputs):
    """Builds a graph with `build(builder, *placeholders)` and runs it on `inputs`."""
    graph = fx.Graph()
    placeholders = [graph.placeholder(f"input_{i}") for i in range(len(inputs))]
    graph.output(build(GraphBuilder(graph, {}), *placeholders))
    return fx.GraphModule(torch.nn.Module(), graph)(*inputs)


@pytest.mark.parametrize("segments", [(16,), (6, 35), (7, 35, 3)])
def test_shards_in_padded_rank_major_order_round_trip_to_global_order(segments):
    ranks, layout = 4, TokenLayout(1, segments)
    full = torch.randn(2, sum(segments), 3)
    group = [ProcessGroupInfo(ranks, rank, "unused") for rank in range(ranks)]
    shards = [_run(lambda b, x, g=g: collectives.slice_to_layout(b, x, layout, g), full) for g in group]
    # What an all-gather of every rank's padded shard gives, rank after rank:
    padded = torch.cat([_run(lambda b, x, g=g: collectives.pad_to_chunks(b, x, 3, layout, g), shard)
                        for g, shard in zip(group, shards)], dim=1)
    assert torch.equal(_run(lambda b, x: collectives.rank_major_to_global(b, x, layout, group[0]), padded), full)
    assert torch.equal(_run(lambda b, x: collectives.global_to_rank_major(b, x, 3, layout, group[0]), full), padded)
    for g, shard in zip(group, shards):
        assert torch.equal(_run(lambda b, x, g=g: collectives.unpad_chunks(
            b, collectives.pad_to_chunks(b, x, 3, layout, g), layout, g), shard), shard)


# ----------------------------------------------------------------------------------------------
# The op registry: one table keyed by OpOverload


def test_the_registry_is_keyed_by_overload_and_a_packet_stands_for_every_overload():
    assert all(isinstance(op, torch._ops.OpOverload) for op in sharding_rules.REGISTRY)
    pointwise = sharding_rules.REGISTRY[aten.add.Tensor].rule
    assert pointwise is not None and sharding_rules.REGISTRY[aten.add.Scalar].rule is pointwise
    assert sharding_rules.overloads(aten.mm) == [getattr(aten.mm, name) for name in aten.mm.overloads()]


@pytest.mark.parametrize("op, fact, expected", [
    (aten._scaled_dot_product_cudnn_attention.default, sharding_rules.is_attention_kernel, True),
    (aten.logsumexp.default, sharding_rules.is_attention_kernel, True),  # ring attention's exact fp32 path
    (aten.mm.default, sharding_rules.is_attention_kernel, False),
    (aten._to_copy.default, sharding_rules.passes_residual_through, True),
    (aten.add.Tensor, sharding_rules.passes_residual_through, False),
    (aten.sym_size.int, sharding_rules.is_size_query, True),
    (aten.sym_size.int, sharding_rules.passes_residual_through, False),
])
def test_op_facts(op, fact, expected):
    assert fact(op) is expected


def test_why_an_op_runs_replicated():
    assert sharding_rules.why_not_local(aten.conv2d.default) == "a convolution mixes neighbouring tokens"
    assert sharding_rules.why_not_local(aten.mm.default) == (
        "it contracts over the token axis of one operand only, or both operands are sharded along dims it does "
        "not contract")
    assert sharding_rules.why_not_local(aten.sort.default) is None  # unknown to the registry
    assert sharding_rules.why_not_local("not an op") is None


def test_the_registry_prints_sorted_and_refuses_what_it_cannot_hold():
    lines = sharding_rules.describe_registry().splitlines()
    assert lines == sorted(lines) and len(lines) == len(sharding_rules.REGISTRY)
    assert "aten._scaled_dot_product_cudnn_attention.default: no rule, attention kernel" in lines
    with pytest.raises(TypeError, match="no op fact"):
        sharding_rules.classify(aten.mm.default, token_local=True)
    with pytest.raises(TypeError, match="takes aten ops"):
        sharding_rules.rule(len)(lambda view: None)


# ----------------------------------------------------------------------------------------------
# Mesh arithmetic, one rank of a fake world


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def join(rank: int, world_size: int):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank, ulysses_rank, ring_rank, sequence_rank", [(0, 0, 0, 0), (1, 1, 0, 1), (2, 0, 1, 2),
                                                                         (3, 1, 1, 3)])
def test_ulysses_groups_are_consecutive_ranks_and_ring_groups_stride_over_them(fake_world, rank, ulysses_rank,
                                                                               ring_rank, sequence_rank):
    from paracompile.mesh import resolve_mesh

    fake_world(rank, 4)
    plan = resolve_mesh({"ulysses": 2, "ring": 2})
    assert (plan.ulysses.size, plan.ring.size, plan.sequence.size) == (2, 2, 4)
    assert (plan.ulysses.rank, plan.ring.rank, plan.sequence.rank) == (ulysses_rank, ring_rank, sequence_rank)
    assert plan.ring_blocks == ((0, 1), (2, 3))
    assert plan.describe_groups() == "ulysses groups [[0, 1], [2, 3]], ring groups [[0, 2], [1, 3]]"


def test_a_new_world_gets_its_own_groups(fake_world):
    """Groups are made once per world: after destroy_process_group and a new init (here at another rank),
    the groups of the old world must not be reused."""
    from paracompile.mesh import resolve_mesh

    fake_world(1, 4)
    before = resolve_mesh({"ulysses": 2, "ring": 2})
    assert resolve_mesh({"ulysses": 2, "ring": 2}).ulysses is before.ulysses  # made once per world
    fake_world(2, 4)
    after = resolve_mesh({"ulysses": 2, "ring": 2})
    assert (after.ulysses.rank, after.ring.rank, after.sequence.rank) == (0, 1, 2)
    assert (before.ulysses.rank, before.ring.rank, before.sequence.rank) == (1, 0, 1)


def test_resolving_a_mesh_releases_the_process_group_torch_pins_in_default_arguments(fake_world, monkeypatch):
    """torch.distributed.nn.functional's `group=group.WORLD` defaults hold the default group when the module is
    first imported after init_process_group (torch.compile's import of torch._dynamo does that), so
    destroy_process_group() could not free it and its gloo threads lived into interpreter teardown. Resolving a
    mesh puts None there (the default group to every call), as an import before init would have."""
    import torch.distributed.nn.functional as functional

    from paracompile.mesh import resolve_mesh

    fake_world(0, 2)
    group = dist.distributed_c10d._get_default_group()
    monkeypatch.setattr(functional.all_reduce, "__defaults__", (dist.ReduceOp.SUM, group))
    monkeypatch.setattr(functional.broadcast, "__defaults__", (group,))
    resolve_mesh({"ulysses": 2})
    assert functional.all_reduce.__defaults__ == (dist.ReduceOp.SUM, None)
    assert functional.broadcast.__defaults__ == (None,)


def test_batch_dim_is_outermost(fake_world):
    from paracompile.mesh import resolve_mesh

    fake_world(3, 4)
    plan = resolve_mesh({"batch": 2, "ulysses": 2})
    assert (plan.batch.size, plan.batch.rank, plan.sequence.size, plan.sequence.rank) == (2, 1, 2, 1)
    assert plan.ring is None


@pytest.mark.parametrize("heads, expected", [([24], (1, 1, 4)), ([3], (1, 4, 1)), ([24, 6], (1, 2, 2)), ([6], (1, 2, 2)),
                                             ([8], (1, 1, 4))])
def test_auto_takes_the_largest_ulysses_degree_that_divides_every_head_count(fake_world, heads, expected):
    from paracompile.mesh import resolve_auto, resolve_mesh

    fake_world(0, 4)
    plan = resolve_auto(resolve_mesh("auto"), heads)
    assert tuple(plan.degrees[name] for name in ("batch", "ring", "ulysses")) == expected


def test_a_contraction_over_tokens_split_alike_is_a_partial_sum():
    """Linear attention's V K: both operands split along the contracted token axis, with the same segments,
    multiply locally into a partial sum (all-reduced by the rewriter); split differently, or only one of
    them, the rule declines (the pass gathers)."""
    node, _ = _node(lambda v, k: torch.matmul(v, k), torch.randn(1, 2, 5, 10), torch.randn(1, 2, 10, 4),
                    target=aten.matmul.default)
    sharding = _apply(node, {"v_1": TokenLayout(3, (10,)), "k_1": TokenLayout(2, (10,))})
    assert sharding.partial == "sum" and sharding.output is None
    assert sharding.inputs == {"self": TokenLayout(3, (10,)), "other": TokenLayout(2, (10,))}
    assert _apply(node, {"v_1": TokenLayout(3, (4, 6)), "k_1": TokenLayout(2, (10,))}) is None
    assert _apply(node, {"v_1": TokenLayout(3, (10,))}) is None
    bmm, _ = _node(lambda v, k: torch.bmm(v, k), torch.randn(2, 5, 10), torch.randn(2, 10, 4), target=aten.bmm.default)
    assert _apply(bmm, {"v_1": TokenLayout(2, (10,)), "k_1": TokenLayout(1, (10,))}).partial == "sum"


def test_pad_keeps_the_token_axis_and_padding_it_adds_a_segment():
    """Padding other dims keeps the layout; constant padding of the token axis (Mochi pads each sample's
    attention output back to the full text length) adds a segment of padding, split over the ranks like the
    others; reflecting or cropping it declines."""
    other_dim, _ = _node(lambda x: torch.nn.functional.pad(x, (0, 0, 0, 1), value=1.0), torch.randn(1, 2, 5, 10),
                         target=aten.pad.default)
    assert _apply(other_dim, {"x_1": TokenLayout(3, (10,))}).output == TokenLayout(3, (10,))
    tokens, _ = _node(lambda x: torch.nn.functional.pad(x, (0, 2)), torch.randn(1, 2, 5, 10), target=aten.pad.default)
    assert _apply(tokens, {"x_1": TokenLayout(3, (6, 4))}).output == TokenLayout(3, (6, 4, 2))
    assert _apply(tokens, {"x_1": TokenLayout(2, (5,))}).output == TokenLayout(2, (5,))



def test_a_reduction_over_the_token_axis_is_a_partial_result_of_its_op():
    """Each rank reduces its shard and the rewriter all-reduces with the matching op: a sum or a mean (which
    divides by the global count first) sums, an amax maxes; a reduction that keeps the token axis stays
    sharded, and one whose partials no all-reduce completes (a variance) declines."""
    x = torch.randn(2, 10, 8)
    tokens = {"x_1": TokenLayout(1, (4, 6))}
    cases = [(lambda x: x.amax(), aten.amax.default, "max"),
             (lambda x: x.amin(dim=(1, 2), keepdim=True), aten.amin.default, "min"),
             (lambda x: torch.max(x), aten.max.default, "max"),
             (lambda x: x.sum(1), aten.sum.dim_IntList, "sum"),
             (lambda x: x.sum(), aten.sum.default, "sum"),
             (lambda x: x.mean(dim=1, keepdim=True), aten.mean.dim, "sum")]
    for function, target, operation in cases:
        node, _ = _node(function, x, target=target)
        sharding = _apply(node, tokens)
        assert sharding.partial == operation and sharding.output is None, (target, sharding)
    kept, _ = _node(lambda x: x.amax(-1), x, target=aten.amax.default)
    assert _apply(kept, tokens).output == TokenLayout(1, (4, 6)) and _apply(kept, tokens).partial is None
    variance, _ = _node(lambda x: x.var(1), x, target=aten.var.dim)
    assert _apply(variance, tokens) is None


def test_a_float8_matrix_product_keeps_its_rows_split_with_a_per_tensor_or_per_row_scale():
    a, b = torch.randn(10, 8), torch.randn(8, 4)

    def scaled(a, b, scale_a, scale_b):
        return torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16)

    for scale_a in (torch.ones(()), torch.ones(10, 1)):
        node = torch.fx.Graph()
        args = [node.placeholder(name) for name in ("a", "b", "scale_a", "scale_b")]
        for value, example in zip(args, (a, b, scale_a, torch.ones(()))):
            value.meta["val"] = example
        call = node.call_function(aten._scaled_mm.default, tuple(args), {"out_dtype": torch.bfloat16})
        call.meta["val"] = torch.empty(10, 4, dtype=torch.bfloat16)
        rows = TokenLayout(0, (10,))
        sharding = _apply(call, {"a": rows})
        assert sharding.output == rows
        assert sharding.inputs == ({"self": rows} if scale_a.numel() == 1 else {"self": rows, "scale_a": rows})
        assert _apply(call, {"b": TokenLayout(0, (8,))}) is None, "the weight's rows are not tokens"
    both, _ = _node(lambda x: torch.nn.functional.pad(x, (3, 2)), torch.randn(1, 2, 5, 10), target=aten.pad.default)
    assert _apply(both, {"x_1": TokenLayout(3, (10,))}).output == TokenLayout(3, (3, 10, 2))
    crop, _ = _node(lambda x: torch.nn.functional.pad(x, (0, -2)), torch.randn(1, 2, 5, 10), target=aten.pad.default)
    assert _apply(crop, {"x_1": TokenLayout(3, (10,))}) is None
    reflect, _ = _node(lambda x: torch.nn.functional.pad(x, (0, 2), mode="reflect"), torch.randn(2, 5, 10),
                       target=aten.pad.default)
    assert _apply(reflect, {"x_1": TokenLayout(2, (10,))}) is None



def test_einsum_follows_the_token_subscript():
    """Latte's unpatchify "nhwpqc->nchpwq" with the tokens in n keeps them at n's place in the output; an
    einsum that sums over the token subscript of operands split alike is a partial sum; an operand split along
    another subscript is asked for split along the token one (the pass re-splits it); a repeated token
    subscript declines."""
    unpatchify, _ = _node(lambda x: torch.einsum("nhwpqc->nchpwq", x), torch.randn(6, 2, 3, 2, 2, 4),
                          target=aten.einsum.default)
    sharding = _apply(unpatchify, {"x_1": TokenLayout(0, (6,))})
    assert sharding.output == TokenLayout(0, (6,)) and sharding.inputs == {"tensors": [TokenLayout(0, (6,))]}
    contraction, _ = _node(lambda v, k: torch.einsum("bnd,bne->bde", v, k), torch.randn(1, 10, 4),
                           torch.randn(1, 10, 4), target=aten.einsum.default)
    sharding = _apply(contraction, {"v_1": TokenLayout(1, (10,)), "k_1": TokenLayout(1, (10,))})
    assert sharding.partial == "sum" and sharding.output is None
    assert _apply(contraction, {"v_1": TokenLayout(1, (10,)), "k_1": TokenLayout(2, (4,))}).inputs == {
        "tensors": [TokenLayout(1, (10,)), TokenLayout(1, (10,))]}
    diagonal, _ = _node(lambda x: torch.einsum("bnn->bn", x), torch.randn(1, 10, 10), target=aten.einsum.default)
    assert _apply(diagonal, {"x_1": TokenLayout(1, (10,))}) is None
    one_side, _ = _node(lambda q, w: torch.einsum("bnd,de->bne", q, w), torch.randn(1, 10, 4), torch.randn(4, 4),
                        target=aten.einsum.default)
    assert _apply(one_side, {"q_1": TokenLayout(1, (10,))}).inputs == {"tensors": [TokenLayout(1, (10,)), None]}
