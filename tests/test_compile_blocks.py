"""Compile once per distinct block (`compile_blocks=True`, paracompile/passes/compile_blocks.py): the graph is
cut into its blocks and the glue between them, parts that are the same graph share one compiled part, and
the output equals eager. The fast tier runs one process with the eager compiler (a part that shared code it
must not share would compute with another block's constants and differ from eager); the slow tier runs
Ulysses 2 and Ring 2 on two ranks, First Block Cache on top, and Inductor."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import paracompile.backend as backend
from paracompile.passes.compile_blocks import structural_key
from tests.conftest import assert_matches, run_compiled_vs_eager, without_callables
from tests.multiprocess import RanksJob
from tests.tiny_models import CASES


def _flux(double=3, single=4):
    """The suite's tiny FLUX with more blocks: 3 double + 4 single."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    base = CASES["flux"].build()
    config = dict(base.config)
    config.update(num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    return FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()


class ScaledBlock(nn.Module):
    """Self-attention whose output is scaled by a Python float and shifted by a tensor made in forward:
    both end up as constants in the graph, one per block, so no two blocks are the same graph."""

    def __init__(self, index: int, width: int = 16, heads: int = 2):
        super().__init__()
        self.index, self.heads = index, heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        return x + attended * (0.5 + self.index) + torch.tensor([float(self.index)] * width)


class Stack(nn.Module):
    def __init__(self, blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(ScaledBlock(i) for i in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=1)


def _compile_counting(model, inputs: dict, options: dict, monkeypatch):
    """(output, explain lines, how many graphs the backend compiled)."""
    compiled_parts = []
    original = backend.compile_whole

    def counting(gm, example_inputs, parsed):
        compiled_parts.append(gm)
        return original(gm, example_inputs, parsed)

    monkeypatch.setattr(backend, "compile_whole", counting)
    torch._dynamo.reset()
    backend.explanations.clear()
    with torch.no_grad():
        output = torch.compile(model, backend="paracompile", options=options)(**inputs)
    return output, list(backend.explanations), len(compiled_parts)


def test_flux_blocks_are_compiled_once_per_distinct_block_and_match_eager(monkeypatch):
    model, inputs = _flux(), CASES["flux"].make_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
    output, lines, compiled = _compile_counting(model, inputs, {"compiler": "eager", "compile_blocks": True},
                                                monkeypatch)
    assert torch.equal(output[0], expected)
    line = next(line for line in lines if line.startswith("compile once per block"))
    # 7 blocks + glue before, between the two loops, after; the 3 double blocks are one graph, and the single
    # blocks between the first and the last (which read the loop's input and feed the output) another.
    assert "(7 blocks)" in line, line
    assert "transformer_blocks.0 .. transformer_blocks.2 (3) share one" in line, line
    assert "single_transformer_blocks.1 .. single_transformer_blocks.2 (2) share one" in line, line
    parts = int(line.split(": ")[1].split(" parts")[0])
    assert compiled == parts - 3, (compiled, line)


def test_blocks_that_differ_in_a_constant_are_compiled_apart(monkeypatch):
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = model(x)
    output, lines, compiled = _compile_counting(model, {"x": x}, {"compiler": "eager", "compile_blocks": True},
                                                monkeypatch)
    assert torch.equal(output, expected)
    line = next(line for line in lines if line.startswith("compile once per block"))
    assert "no two blocks alike" in line and compiled == int(line.split(": ")[1].split(" parts")[0]), line


def test_a_graph_without_a_block_loop_is_compiled_whole(monkeypatch):
    torch.manual_seed(0)
    block, x = ScaledBlock(1).eval(), torch.randn(2, 8, 16)
    with torch.no_grad():
        expected = block(x)
    output, lines, compiled = _compile_counting(block, {"x": x}, {"compiler": "eager", "compile_blocks": True},
                                                monkeypatch)
    assert torch.equal(output, expected) and compiled == 1
    assert any(line.startswith("compile once per block: off (no ModuleList") for line in lines), lines


def test_backward_through_compiled_blocks_raises():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 8, 16)
    torch._dynamo.reset()
    output = torch.compile(model, backend="paracompile", options={"compiler": "eager", "compile_blocks": True})(x)
    with pytest.raises(RuntimeError, match="compile_blocks=True is not supported"):
        output.sum().backward()


def test_structural_key_ignores_names_and_sees_constants():
    def traced(scale: float, name: str) -> fx.GraphModule:
        def block(x, w):
            return torch.relu(x @ w) * scale

        gm = fx.symbolic_trace(block)
        for node in gm.graph.nodes:
            node.name = f"{name}_{node.name}"
            if node.op == "placeholder":
                node.meta["val"] = torch.empty(4, 4)
        gm.recompile()
        return gm

    assert structural_key(traced(2.0, "first")) == structural_key(traced(2.0, "second"))
    assert structural_key(traced(2.0, "first")) != structural_key(traced(3.0, "first"))


def test_compile_blocks_must_be_bool():
    from paracompile.options import parse_options

    with pytest.raises(ValueError, match="option 'compile_blocks' must be bool"):
        parse_options({"compile_blocks": 1})


# ---------------------------------------------------------------------------------------------------- ranks

SCENARIOS = {
    "ulysses2": dict(mesh={"ulysses": 2}, compiler="eager"),
    "ring2": dict(mesh={"ring": 2}, compiler="eager"),
    "ulysses2_fbcache": dict(mesh={"ulysses": 2}, compiler="eager", threshold=0.05),
}
# Through Inductor: test_a_second_resolution_reuses_the_compiled_blocks_on_two_ranks (Ulysses 2, symbolic sizes);
# Ring through Inductor on the whole graph: tests/test_meshes.py.


def _run_world(rank, world_size):
    results = {}
    for name, options in SCENARIOS.items():
        torch._dynamo.reset()
        results[name] = without_callables(run_compiled_vs_eager(
            _flux(), CASES["flux"].make_inputs(), dict(options, compile_blocks=True, check_inputs="off"),
            output_of=lambda out: out[0]))
    return results


TWO_RANKS = RanksJob(_run_world, 2, timeout=900)


@pytest.fixture(scope="module")
def two_ranks():
    return TWO_RANKS.result()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_blocks_compiled_once_on_two_ranks_match_eager(two_ranks, name):
    for rank, results in enumerate(two_ranks):
        result = results[name]
        assert result["error"] is None, result["error"]
        assert_matches(result["output"], result["expected"], f"rank {rank} {name}")
        lines = [line for report in result["explanations"] for line in report.splitlines()
                 if line.startswith("compile once per block")]
        # With the cache, block 0 runs in the cache's head part; the rest part holds the other blocks.
        shared = ("transformer_blocks.1 .. transformer_blocks.2 (2) share one" if "fbcache" in name
                  else "transformer_blocks.0 .. transformer_blocks.2 (3) share one")
        assert any(shared in line for line in lines), lines


class ScalarConstantBlock(ScaledBlock):
    """A 0-d tensor made in forward: a constant the key must hash (and can)."""

    def forward(self, x):
        return super().forward(x) * torch.tensor(1.0 + self.index)


def test_zero_dim_constants_are_keyed_and_the_output_matches(monkeypatch):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 8, 16)
    model.blocks = nn.ModuleList(ScalarConstantBlock(i) for i in range(3))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    output, lines, _ = _compile_counting(model, {"x": x}, {"compiler": "eager", "compile_blocks": True}, monkeypatch)
    assert torch.equal(output, expected)
    assert any(line.startswith("compile once per block: ") and "off" not in line for line in lines), lines


def test_values_are_released_after_their_last_reader():
    """Each block's streams go once the part after it has read them: peak memory does not grow with the
    number of blocks."""
    import weakref

    from paracompile.passes.compile_blocks import RunByBlock, split_by_block
    from paracompile.passes.trace_to_aten import trace_to_aten

    torch.manual_seed(0)
    model, x = Stack(blocks=5).eval(), torch.randn(2, 8, 16)
    captured = {}

    def keep_graph(gm, example_inputs):
        captured["gm"], captured["inputs"] = trace_to_aten(gm, example_inputs), list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expected = torch.compile(model, backend=keep_graph)(x)
    split = split_by_block(captured["gm"])
    produced, alive_at_call = [], []

    def recording(part):
        def run(*args):
            alive_at_call.append(sum(ref() is not None for ref in produced))
            outputs = part.graph_module.forward(*args)
            produced.extend(weakref.ref(t) for t in outputs if isinstance(t, torch.Tensor))
            return outputs
        return run

    runner = RunByBlock(split, {part.key: None for part in split.parts})
    runner.steps = [(recording(part), inputs, outputs, done)
                    for (_, inputs, outputs, done), part in zip(runner.steps, split.parts)]
    with torch.no_grad():
        output = runner(*captured["inputs"])
    assert torch.equal(output[0] if isinstance(output, (list, tuple)) else output, expected)
    # When a part runs, only what the part before it produced is still alive (its own inputs).
    assert max(alive_at_call) <= 1, alive_at_call


def _plain_symbols(value) -> set:
    sizes = [*value.shape, *value.stride()] if isinstance(value, torch.Tensor) else []
    return {size.node.expr for size in sizes if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol}


@pytest.mark.slow  # 12-15 s of tracing: one process, but the fast tier's largest test
def test_every_part_can_read_its_symbolic_sizes_off_its_tensor_inputs(monkeypatch):
    """With the token count symbolic (s0) and sharded, a block reads token shards of (s0 + 1) // 2 tokens and
    s0 itself as a SymInt: Inductor cannot invert the first and renames the second, and failed with
    "expected [s0] to have been codegen-ed". Each part also gets a graph input whose size is s0 itself.
    Checked here on rank 0 of a fake 2-rank world (one process), part by part."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import paracompile.passes.compile_blocks as compile_blocks

    parts = []
    original = compile_blocks._build_part

    def keep(*args, **kwargs):
        parts.append(original(*args, **kwargs))
        return parts[-1]

    monkeypatch.setattr(compile_blocks, "_build_part", keep)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model, inputs = _flux(), CASES["flux"].make_inputs()
        torch._dynamo.mark_dynamic(inputs["hidden_states"], 1)
        torch._dynamo.mark_dynamic(inputs["img_ids"], 0)
        _compile_counting(model, inputs, {"compiler": "eager", "compile_blocks": True, "mesh": {"ulysses": 2},
                                          "check_inputs": "off"}, monkeypatch)
    finally:
        dist.destroy_process_group()
    assert len(parts) > 7
    for part in parts:
        values = [node.meta.get("val") for node in part.graph_module.graph.nodes]
        used = set().union(*(compile_blocks._free_symbols(value) for value in values))
        readable = set().union(*(_plain_symbols(node.meta.get("val")) for node in part.graph_module.graph.nodes
                                 if node.op == "placeholder"))
        assert used, part.name  # the token count is symbolic in every part
        assert used <= readable, (part.name, used, readable)


def _run_two_resolutions(rank, world_size):
    """Ulysses 2 with Inductor, compile once per block, token dims marked dynamic: a second resolution runs
    on the same compiled parts (no new compile) and both match eager. 3 double blocks (the last two share
    a part) and 2 single ones: 6 Inductor compiles, where 3 + 4 blocks took 8 for the same kernels."""
    torch._dynamo.reset()
    model = _flux(double=3, single=2)
    compiles = []
    from paracompile import paracompile_backend

    options = {"mesh": {"ulysses": 2}, "compile_blocks": True, "check_inputs": "off"}

    def counting(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return paracompile_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=counting)
    results = {}
    for size in ("default", "other"):
        inputs = CASES["flux"].make_inputs(size=size)
        torch._dynamo.mark_dynamic(inputs["hidden_states"], 1)
        torch._dynamo.mark_dynamic(inputs["img_ids"], 0)
        results[size] = without_callables(run_compiled_vs_eager(model, inputs, {}, output_of=lambda out: out[0],
                                                                compiled=compiled))
        results[size]["compiles"] = len(compiles)
    return results


TWO_RESOLUTIONS = RanksJob(_run_two_resolutions, 2, timeout=900)


@pytest.mark.slow
def test_a_second_resolution_reuses_the_compiled_blocks_on_two_ranks():
    for rank, results in enumerate(TWO_RESOLUTIONS.result()):
        for size, result in results.items():
            assert result["error"] is None, result["error"]
            assert_matches(result["output"], result["expected"], f"rank {rank} {size}")
            assert result["compiles"] == 1, (size, result["compiles"])
        lines = [line for report in results["default"]["explanations"] for line in report.splitlines()
                 if line.startswith("compile once per block")]
        assert any("transformer_blocks.1 .. transformer_blocks.2 (2) share one" in line for line in lines), lines
