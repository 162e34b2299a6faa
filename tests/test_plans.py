"""The sharding plan of whole models, in one process (the fast tier): the backend rewrites each tiny model's
graph as rank 0 of a fake 2-rank world (torch's fake process group: collectives keep their shapes and move
nothing, so outputs are not checked here; the multi-process tests check them against eager). What is
checked is the plan the report states: every attention runs sharded, no attention falls back to replicated,
and the only gathers are the model's own exits (an unpatchify, the graph output, a reduction over tokens, a
write the shards cannot follow), as many as the model needs. A broken token rule shows up here as an extra
gather or a replicated attention."""
from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch

import paracompile.backend as backend
from paracompile.passes import sharding_rules
from tests import tiny_models
from tests.conftest import report_sections
from tests.toy_dit import ToyDiT, toy_inputs

aten = torch.ops.aten

EXIT_REASONS = ("graph output", "it splits or merges the token axis with other dims", "it reduces over the token axis",
                "writes in place into it through a view the shards cannot follow",
                "advanced indexing may pick any token")

# model -> (attentions, gathers) its plan has on 2 ranks
PLANS = {
    "toy": (3, 1),
    "flux": (3, 1),
    "sd3": (3, 1),
    "wan_t2v": (4, 1),
    # The token refiner's masked mean over text tokens is a partial sum; its mask's in-place write (through a
    # `.bool()` of a bool tensor, which returns the tensor itself) stays on shards.
    "hunyuan_video": (4, 1),
    "qwen_image": (2, 1),
    # Linear self-attention: its token contractions are partial sums (all-reduced); each block's
    # convolution over the image (an unflatten of the tokens) and the output gather.
    "sana": (2, 3),
    "sana_video": (2, 3),  # and its normaliser, a sum over the tokens, is a partial sum too
    "flux2": (2, 1),
    # CogVideoX's in-place rotary update of q and k: the views it read them through are not rebuilt.
    "consisid": (1, 1),
    # The token axis is the frames (the temporal blocks' sequence): the spatial blocks' attention is split
    # along its batch of frames, and the unpatchify einsum keeps the frames split.
    "latte": (3, 1),
    # One graph with Dynamo's capture_dynamic_output_shape_ops (DYNAMO_CONFIG): the joint attention over image
    # and valid text tokens (a data-dependent segment) on shards; block 1 indexes the text stream, which block
    # 0 left split, with the valid-token indices (3 gathers of text), and the unpatchify.
    "mochi": (3, 4),
    # Issue 14's second round: every attention sharded, one gather (the output or the unpatchify) each.
    "chroma": (2, 1),  # an [S, S] mask from the outer product of the text + image mask
    "cogview4": (1, 1),  # in-place rotary write into q and k through a no-op `.to(dtype)`
    "cogview3plus": (1, 1),
    "auraflow": (2, 1),  # register tokens joined to the text: three segments
    "allegro": (2, 1),
    "cosmos": (2, 1),
    "skyreels_v2": (2, 1),
    "wan_vace": (4, 1),  # a VACE block next to the Wan block, their hints added scaled
    "z_image": (3, 1),  # per-sample lists stacked with pad_sequence; caption and image refiners
    "dit": (1, 1),
    "easyanimate": (1, 1),
    "bria": (2, 1),
    "longcat_image": (2, 1),
    "ovis_image": (2, 1),
    "chronoedit": (3, 1),
    "kandinsky5": (3, 1),  # text blocks: Ulysses over the text; the cross-attention's keys come from them, split
    # Two token axes, video and audio: each stream's self-attention, and the cross-attention from each to the other,
    # run Ulysses with queries and keys split differently; the two outputs are the gathers.
    "ltx2": (6, 2),
    # The text fusion's attention across the tapped layers, per token, runs on each rank's tokens.
    "krea2": (3, 1),
    "ernie_image": (1, 1),  # sequence-first: the token axis is dim 0
    "prx": (1, 1),  # image queries, text + image keys
    "flux3": (3, 1),  # text-only and image-only blocks, then joint single blocks
    "bria_fibo": (2, 1),  # a text-encoder layer per block, mixed into its text stream; a key mask
}
# What an attention line says when it runs sharded without a strategy's exchange, or has nothing to split
# (Mochi's caption pooler attends from one pooled query to the text).
NO_EXCHANGE = ("local (keys/values replicated", "local (split along dim", "replicated (no input is token-sharded)")
# Dynamo settings a model is compiled with: Mochi's per-sample `nonzero` stays in its graph with this one.
DYNAMO_CONFIG = {"mochi": {"capture_dynamic_output_shape_ops": True}}


def _model(name):
    torch.manual_seed(0)
    if name == "toy":
        return ToyDiT().eval(), toy_inputs()
    case = tiny_models.CASES[name]
    return case.build(), case.make_inputs()


class Traced(NamedTuple):
    aten_graphs: list  # the aten trace (trace_to_aten) of each Dynamo graph with attention, for planning by hand
    reports: dict  # mesh key -> the backend's report of the last graph it rewrote on that mesh


def _mesh_key(mesh: dict) -> tuple:
    return tuple(sorted(mesh.items()))


@functools.lru_cache(maxsize=None)
def _traced(name: str, mesh_keys: tuple) -> Traced:
    """`name` traced by Dynamo once, and inside that trace: each graph's aten trace, and the backend run on each
    graph on every mesh of `mesh_keys`. Dynamo's graphs do not depend on the mesh, and a Dynamo trace is most of
    a plan's time, so the checks of one model share it (the aten graphs are only read: a rewrite builds a new
    graph). Run as rank 0 of the fake world (`fake_rank0`)."""
    from paracompile import paracompile_backend
    from paracompile.passes.sharding_plan import attention_nodes
    from paracompile.passes.trace_to_aten import trace_to_aten

    model, inputs = _model(name)
    aten_graphs, reports = [], {}

    def capture(gm, example_inputs):
        aten_graph = trace_to_aten(gm, example_inputs)
        if attention_nodes(aten_graph.graph):
            aten_graphs.append(aten_graph)
        for key in mesh_keys:
            recorded = len(backend.explanations)
            paracompile_backend(gm, example_inputs, options={"compiler": "eager", "mesh": dict(key),
                                                             "check_inputs": "off"})
            if len(backend.explanations) > recorded:
                reports[key] = backend.explanations[-1]
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(DYNAMO_CONFIG.get(name, {})):
        torch.compile(model, backend=capture)(**inputs)
    torch._dynamo.reset()
    return Traced(aten_graphs, reports)


def plan_of(name: str, mesh: dict) -> dict:
    """The report's sections for `name` compiled on `mesh`: {"attention": [...], "gathered": [...], ...}."""
    return report_sections(_traced(name, PLAN_MESHES.get(name, ())).reports[_mesh_key(mesh)])


def assert_plan(sections: dict, name: str, strategy: str) -> None:
    """Every attention of `name` runs `strategy` (or has nothing to exchange), as many as PLANS says, and the
    only gathers are the model's exits."""
    attentions, gathers = PLANS[name]
    assert len(sections["attention"]) == attentions, sections["attention"]
    for line in sections["attention"]:
        assert strategy in line or any(text in line for text in NO_EXCHANGE), line
    assert len(sections.get("gathered", [])) == gathers, sections.get("gathered")
    for line in sections.get("gathered", []):
        assert any(reason in line for reason in EXIT_REASONS), line


# Issue 14's second round, besides the models whose plans needed a general fix (cogview4: a no-op `.to`; z_image:
# pad_sequence and cuts through joined tables; ltx2: two token axes): each plan takes 1-4 s to trace, so these are
# checked where they run against eager, on their one mesh (tests/test_diffusers_models.py, ONE_MESH, with
# assert_plan), not traced again here.
PLANS_CHECKED_IN_THE_WORLD = {"chroma", "cogview3plus", "auraflow", "allegro", "cosmos", "skyreels_v2", "wan_vace", "dit", "easyanimate",
              "bria", "longcat_image", "ovis_image", "chronoedit", "kandinsky5", "krea2", "ernie_image", "prx", "flux3",
              "bria_fibo"}


PLAN_CHECKS = ([(name, {"ulysses": 2}) for name in PLANS if name not in PLANS_CHECKED_IN_THE_WORLD]
               + [("flux", {"ring": 2}), ("wan_t2v", {"ring": 2})])
# name -> the meshes its plan is checked on, all compiled in the model's one trace (`_traced`)
PLAN_MESHES = {name: tuple(_mesh_key(mesh) for checked, mesh in PLAN_CHECKS if checked == name) for name, _ in PLAN_CHECKS}


@pytest.mark.parametrize("name, mesh", PLAN_CHECKS)
def test_every_attention_is_sharded_and_the_only_gathers_are_exits(fake_rank0, name, mesh):
    assert_plan(plan_of(name, mesh), name, "ulysses over 2 ranks" if "ulysses" in mesh else "ring over 2 ranks")


def test_a_broken_rule_shows_in_the_plan(fake_rank0, monkeypatch):
    """The check above catches a rule that stops following the token axis: with `add` declining, FLUX's
    residual additions gather their inputs."""
    from paracompile.mesh import resolve_mesh
    from paracompile.passes.sharding_plan import plan_sharding
    from paracompile.passes.ulysses_attention import SequenceAttention

    mesh = resolve_mesh({"ulysses": 2})
    aten_graph, = _traced("flux", PLAN_MESHES["flux"]).aten_graphs
    assert len(plan_sharding(aten_graph, 2, SequenceAttention(mesh)).gathers) == PLANS["flux"][1]
    declines = lambda view: None  # noqa: E731
    for overload in sharding_rules.overloads(aten.add):
        monkeypatch.setattr(sharding_rules.REGISTRY[overload], "rule", declines)
    assert len(plan_sharding(aten_graph, 2, SequenceAttention(mesh)).gathers) > PLANS["flux"][1]


class TableTimesJointQueries(torch.nn.Module):
    """HiDream's rotary embedding in miniature: q, k, v concatenate image and text tokens (two segments),
    while the rotary table arrives as one input over all tokens (one segment), and multiplies first."""

    def __init__(self, width=32, heads=4, table_first=True):
        super().__init__()
        self.heads, self.table_first = heads, table_first
        self.image_qkv = torch.nn.Linear(width, 3 * width)
        self.text_qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, image, text, cos):
        batch, width = image.shape[0], image.shape[-1]
        qkv = torch.cat([self.image_qkv(image), self.text_qkv(text)], dim=1)
        tokens = qkv.shape[1]
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if self.table_first:
            q, k = cos * q, cos * k
        else:
            q, k = q * cos, k * cos
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, width))


def table_inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(image=torch.randn(1, 16, 32, generator=generator), text=torch.randn(1, 6, 32, generator=generator),
                cos=torch.randn(22, 8, generator=generator))


@pytest.mark.parametrize("table_first", [True, False])
@pytest.mark.parametrize("mesh", [{"ulysses": 2}, {"ring": 2}])
def test_a_pointwise_op_keeps_the_split_of_its_costlier_operand_whatever_the_order(fake_rank0, mesh, table_first):
    """`cos * q` and `q * cos` plan alike: the table is re-sliced to q's text and image segments (free:
    it was cut from a full input), q is not re-split (a gather), and Ring finds q, k and v split alike."""
    torch.manual_seed(0)
    model = TableTimesJointQueries(table_first=table_first).eval()
    torch._dynamo.reset()
    backend.explanations.clear()
    with torch.no_grad():
        torch.compile(model, backend="paracompile",
                      options={"compiler": "eager", "mesh": mesh, "check_inputs": "off"})(**table_inputs())
    report = backend.explanations[-1]
    assert "ring over 2 ranks" in report if "ring" in mesh else "ulysses over 2 ranks" in report, report
    assert "query segments ['16', '6'], key segments ['16', '6']" in report or "ring" not in mesh, report
    assert "re-split" not in report, report
    assert "gathered to full tensors: 1\n    - linear_2: graph output" in report, report


class PaddedImageWithOneTable(torch.nn.Module):
    """Z-Image's token layout in miniature: the image tokens are padded with a learned token to a longer
    length (two segments: real and padding), then joined with the text; the rotary table covers the padded
    image as one input and is joined with the text's table (one segment, then the text's). `write_through_a_
    conversion`: CogView4's rotary update, written in place into a slice of `norm(q).to(q.dtype)`."""

    def __init__(self, width=32, heads=4, padded=8, write_through_a_conversion=False):
        super().__init__()
        self.heads, self.padded, self.write = heads, padded, write_through_a_conversion
        self.pad_token = torch.nn.Parameter(torch.randn(1, 1, width))
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.norm = torch.nn.LayerNorm(width // heads)
        self.out = torch.nn.Linear(width, width)

    def forward(self, image, text, image_table, text_table):
        batch, width = image.shape[0], image.shape[-1]
        padding = self.pad_token.expand(batch, self.padded - image.shape[1], width)
        joint = torch.cat([torch.cat([image, padding], dim=1), text], dim=1)
        tokens = joint.shape[1]
        q, k, v = self.qkv(joint).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        table = torch.cat([image_table, text_table], dim=0)
        if self.write:
            q = self.norm(q).to(q.dtype)
            q[:, :, : self.padded] = q[:, :, : self.padded] * table[: self.padded]
        else:
            q, k = q * table, k * table
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, width))


def padded_inputs():
    generator = torch.Generator().manual_seed(0)
    return dict(image=torch.randn(1, 5, 32, generator=generator), text=torch.randn(1, 6, 32, generator=generator),
                image_table=torch.randn(8, 8, generator=generator), text_table=torch.randn(6, 8, generator=generator))


def _report_of(model, inputs, mesh):
    torch._dynamo.reset()
    backend.explanations.clear()
    with torch.no_grad():
        torch.compile(model, backend="paracompile",
                      options={"compiler": "eager", "mesh": mesh, "check_inputs": "off"})(**inputs)
    return backend.explanations[-1]


def test_a_table_joined_with_another_is_cut_with_the_segments_its_part_meets(fake_rank0):
    """The queries carry three segments (real image, padding, text); the table two (padded image, text), joined
    by a cat. The plan walks back through the cat and cuts the image table with the two segments its part of
    the queries has, so nothing is re-split (a gather per use before)."""
    report = _report_of(PaddedImageWithOneTable().eval(), padded_inputs(), {"ulysses": 2})
    assert "query segments ['5', '3', '6']" in report, report
    assert "re-split" not in report, report
    assert "(L_image_table_) along dim 0 (segments ['5', '3'])" in report, report
    assert "gathered to full tensors: 1\n    - linear_1: graph output" in report, report


def test_an_in_place_write_through_a_conversion_that_changes_nothing_stays_on_shards(fake_rank0):
    """`norm(q).to(q.dtype)` returns its input itself, so the rotary update written into a slice of it
    reaches q's storage on shards: no gather for the write (three before: the norm's output, the
    conversion, the write)."""
    report = _report_of(PaddedImageWithOneTable(write_through_a_conversion=True).eval(), padded_inputs(),
                        {"ulysses": 2})
    assert "ulysses over 2 ranks" in report, report
    assert "writes in place" not in report, report
    assert "gathered to full tensors: 1\n    - linear_1: graph output" in report, report


class AttentionInputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, as the rewritten graph runs, the storages the collectives return and the storages each
    attention kernel reads its query, key and value from."""

    def __init__(self):
        super().__init__()
        self.exchanged, self.attention = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        result = func(*args, **(kwargs or {}))
        if func is torch.ops._c10d_functional.wait_tensor.default:
            self.exchanged.add(StorageWeakRef(result.untyped_storage()))
        elif "attention" in func.__name__:
            self.attention.append([StorageWeakRef(t.untyped_storage()) for t in args[:3]])
        return result


@pytest.mark.parametrize("name, chunks, kernels", [("toy", 1, 3), ("toy", 2, 5), ("flux", 1, 3)])
def test_ulysses_attention_reads_its_inputs_where_the_exchange_left_them(fake_rank0, name, chunks, kernels):
    """The first all-to-all lays out what it sends so that q, k and v arrive as views of the received buffer:
    attention reads them there, with no copy in between (a copy per tensor per attention cost full FLUX
    1.8 ms a step on one H200 as rank 0 of 2). Fused q/k/v exchanges, per-chunk ones, and separate ones
    (the toy's attention of 16 image queries to 6 text keys)."""
    from paracompile import paracompile_backend

    model, inputs = _model(name)
    torch._dynamo.reset()
    recorder = AttentionInputs()
    options = {"compiler": "eager", "mesh": {"ulysses": 2}, "check_inputs": "off", "ulysses_chunks": chunks}

    def recording_backend(gm, example_inputs):
        compiled = paracompile_backend(gm, example_inputs, options=options)

        def run(*args):
            with recorder:  # entered here, after Dynamo: a dispatch mode around the model would turn Dynamo off
                return compiled(*args)
        return run

    with torch.no_grad():
        torch.compile(model, backend=recording_backend)(**inputs)
    assert len(recorder.attention) == kernels  # the toy's cross-shaped attention (16 queries, 6 keys) has one chunk
    for storages in recorder.attention:
        assert all(storage in recorder.exchanged for storage in storages)


def _sharding_of(name: str, mesh: dict):
    """Each Dynamo graph of `name` with attention, planned (sharding_plan.plan_sharding) and rewritten
    (shard_tokens.TokenShardingRewriter) by hand as the backend would: [(plan, rewriter, report)]."""
    from paracompile.explain import Report
    from paracompile.mesh import resolve_mesh
    from paracompile.passes.shard_tokens import TokenShardingRewriter
    from paracompile.passes.sharding_plan import plan_sharding
    from paracompile.passes.ulysses_attention import SequenceAttention

    mesh_plan = resolve_mesh(mesh)
    results = []
    for aten_graph in _traced(name, PLAN_MESHES.get(name, ())).aten_graphs:
        strategy = SequenceAttention(mesh_plan)
        plan = plan_sharding(aten_graph, mesh_plan.sequence.size, strategy)
        report = Report()
        rewriter = TokenShardingRewriter(aten_graph, mesh_plan.sequence, report, strategy, mesh_plan, plan)
        rewriter.run()
        results.append((plan, rewriter, report))
    return results


# The fast tier keeps one model per feature the docstring below names; the others run with the slow tests.
REWRITE_CHECKS_SLOW = {("sd3", "ulysses"), ("wan_t2v", "ulysses"), ("hunyuan_video", "ulysses"),
                       ("qwen_image", "ulysses"), ("omnigen", "ulysses"), ("flux", "ring"), ("lumina2", "ring")}


@pytest.mark.parametrize("name, mesh", [
    pytest.param(name, {strategy: 2}, marks=[pytest.mark.slow] * ((name, strategy) in REWRITE_CHECKS_SLOW))
    for strategy, names in (("ulysses", ("toy", "flux", "sd3", "wan_t2v", "hunyuan_video", "qwen_image", "lumina2",
                                         "consisid", "hunyuan_image", "mochi", "omnigen")),
                            ("ring", ("toy", "flux", "lumina2", "hidream", "latte")))
    for name in names])
def test_the_rewrite_does_what_its_plan_says(fake_rank0, name, mesh):
    """The plan is made before the rewrite, from layouts alone; the rewrite then follows it: every node ends
    with the layout the plan gave it, every attention becomes what the plan says, the same values are
    gathered, and no source needs another cut (the plan settled segment conflicts, so the rewrite runs once).
    Lumina2 writes in place into buffers; the toy and HiDream need a cut with text and image segments; ConsisID
    writes its rotary update into q and k; HunyuanImage's graph breaks leave one graph per block (OmniGen's leave
    its blocks one graph); Latte attends along its frames and within each frame; Mochi's text segment has a
    data-dependent length."""
    graphs = _sharding_of(name, mesh)
    assert graphs
    for plan, rewriter, report in graphs:
        actual = {}
        for node, value in rewriter.env.items():
            layout = getattr(value, "layout", None) if getattr(value, "native_sharded", False) else None
            if node in plan.layouts:
                actual[node] = layout
        mismatched = [(node.name, plan.layouts[node], layout) for node, layout in actual.items()
                      if (plan.layouts[node] is None) != (layout is None)
                      or (layout is not None and plan.layouts[node] != layout)]
        assert not mismatched, mismatched[:5]
        assert rewriter.missed_cuts() == {}
        assert set(plan.cuts) == rewriter.cut_sources
        kinds = {"ulysses": "ulysses over", "ring": "ring over", "local": "local (", "replicated": "replicated ("}
        assert [kinds[site.kind] for site in plan.attention.values()] == \
            [next(k for k in kinds.values() if k in line) for line in report.attention]
        gathered = sorted(line.split(":")[0] for line in report.gathers if "written on the full" not in line)
        assert sorted(node.name for node, _ in plan.gathers) == gathered


def test_a_source_is_cut_with_the_segments_its_users_need_before_the_rewrite(fake_rank0, monkeypatch):
    """The toy's token positions are one `arange` over text and image tokens, meeting queries that
    concatenate the two: the plan cuts it with both segments in a second planning round (the first would
    have re-split it, a gather), and the rewrite runs once."""
    from paracompile.passes import shard_tokens

    runs = []
    original = shard_tokens.TokenShardingRewriter.run
    monkeypatch.setattr(shard_tokens.TokenShardingRewriter, "run", lambda self: runs.append(1) or original(self))
    (plan, rewriter, report), *_ = _sharding_of("toy", {"ulysses": 2})
    assert plan.rounds == 2
    assert any(len(layout.segments) == 2 for layout in plan.cuts.values())
    assert not any("re-split" in reason for _, reason in plan.gathers)
    runs.clear()
    _report_of(*_model("toy"), {"ulysses": 2})  # the backend's own compile
    assert runs == [1]


def test_each_compile_keeps_its_report_and_graph_on_a_context_its_callable_carries(fake_rank0):
    """The backend makes one CompileContext per call (paracompile/context.py): the callable it returns
    carries it, with that compile's report, rewritten graph and resolved mesh; the public registry
    (`paracompile.explanations()`) holds every compile's texts as well."""
    import paracompile
    from paracompile import paracompile_backend

    returned = []

    def capturing(gm, example_inputs):
        returned.append(paracompile_backend(gm, example_inputs, options={"compiler": "eager", "check_inputs": "off"}))
        return returned[-1]

    for name in ("toy", "flux"):
        model, inputs = _model(name)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=capturing)(**inputs)
    contexts = [compiled.paracompile_context for compiled in returned]
    assert len(contexts) == 2 and contexts[0] is not contexts[1]
    for context in contexts:
        assert context.records == [context.report.format()]
        assert "ulysses over 2 ranks" in context.records[0]
        assert context.mesh.degrees == {"batch": 1, "ring": 1, "ulysses": 2} and context.mesh.auto_reason
        assert context.options.compiler == "eager"
        assert context.records[0] in paracompile.explanations()
        assert any(graph is context.rewritten_graph for graph in backend.rewritten_graphs)
    assert contexts[0].rewritten_graph is not contexts[1].rewritten_graph


def test_a_callable_that_takes_no_attribute_is_wrapped_to_carry_its_context():
    from paracompile.context import CompileContext, with_context
    from paracompile.mesh import resolve_mesh
    from paracompile.options import parse_options

    context = CompileContext(parse_options({}), resolve_mesh("auto"))
    wrapped = with_context(torch.nn.Identity().forward, context)  # a bound method
    assert wrapped.paracompile_context is context and wrapped(3) == 3
