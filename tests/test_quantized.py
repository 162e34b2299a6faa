"""torchao-quantized weights (tensor subclasses lifted into graph inputs) on a mesh: the trace sees their inner
tensors (passes/subclass_inputs.py), torchao's quantize ops as aten ops, and `y += bias` out of place
(passes/out_of_place.py), so the plan is the unquantized model's: every attention sharded, the output the only
gather."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import paracompile.backend as backend
from paracompile.passes.out_of_place import writes_out_of_place
from tests import tiny_models
from tests.multiprocess import run_on_ranks
from tests.test_plans import fake_rank0  # noqa: F401 (a fixture)

aten = torch.ops.aten


def _quantized_flux(config: str):
    quantization = pytest.importorskip("torchao.quantization")
    configs = {"int8wo": quantization.Int8WeightOnlyConfig,
               "int8dyn": quantization.Int8DynamicActivationInt8WeightConfig}
    torch.manual_seed(0)
    case = tiny_models.CASES["flux"]
    model = case.build()
    quantization.quantize_(model, configs[config]())
    return case, model, case.make_inputs(seed=0, size="uneven")


@pytest.mark.parametrize("config", ["int8wo", "int8dyn"])
@pytest.mark.parametrize("mesh", [{"ulysses": 2}, {"ring": 2}])
def test_quantized_flux_plan_is_the_plain_one(fake_rank0, config, mesh):
    _, model, inputs = _quantized_flux(config)
    torch._dynamo.reset()
    backend.explanations.clear()
    with torch.no_grad():
        torch.compile(model, backend="paracompile",
                      options={"compiler": "eager", "mesh": mesh, "check_inputs": "off"})(**inputs)
    report = backend.explanations[-1]
    strategy = "ulysses over 2 ranks" if "ulysses" in mesh else "ring over 2 ranks"
    assert report.count(strategy) == 3, report
    assert "gathered to full tensors: 1\n" in report and "graph output" in report, report
    graph = backend.rewritten_graphs[-1].graph
    names = [str(node.target) for node in graph.nodes if node.op == "placeholder"]
    assert "L_self_dict_modules_x_embedder_parameters_weight_qdata_" in names
    assert not [node for node in graph.nodes if node.op == "get_attr"], "weights baked in as constants"


def _against_eager(rank, world_size, config, mesh):
    case, model, inputs = _quantized_flux(config)
    with torch.no_grad():
        want = case.output(model(**inputs))
        compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "mesh": mesh})
        return (case.output(compiled(**inputs)) - want).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["int8wo", "int8dyn"])
def test_quantized_flux_matches_eager(config):
    # int8dyn quantizes each token's activations: ring attention's blockwise softmax can move a value
    # across a rounding boundary, hence the looser bound.
    errors = run_on_ranks(_against_eager, 2, config, {"ring": 2}, timeout=600)
    assert max(errors) < (1e-5 if config == "int8wo" else 1e-3), errors


def _written_out_of_place(function, *inputs) -> bool:
    gm = make_fx(function, pre_dispatch=True)(*inputs)
    writes_out_of_place(gm.graph)
    gm.recompile()
    targets = {node.target for node in gm.graph.nodes}
    assert torch.equal(gm(*[i.clone() for i in inputs]), function(*[i.clone() for i in inputs]))
    return aten.add_.Tensor not in targets


def test_a_write_nothing_reads_afterwards_runs_out_of_place():
    bias = torch.randn(4)

    def dead(x):
        y = (x * 2).reshape(2, 4)
        y += bias
        return y

    def base_read_later(x):
        product = x * 2
        y = product.reshape(2, 4)
        y += bias
        return product + 1

    def into_input(x):  # the caller sees the write
        return x.view(2, 4).add_(bias) * 1

    x = torch.randn(8)
    assert _written_out_of_place(dead, x)
    assert not _written_out_of_place(base_read_later, x)
    assert not _written_out_of_place(into_input, x)


def test_a_graph_calling_an_aten_overload_is_not_taken_for_custom_ops():
    """Dynamo's graphs call op packets, but an overload where it captured an aten call itself (data-dependent
    ops under `capture_dynamic_output_shape_ops`); overloads have no `_qualified_op_name`."""
    import paracompile.differentiable  # noqa: F401 (registers the paracompile:: ops)
    from paracompile.passes.trace_to_aten import _calls_custom_ops

    def graph_calling(*targets):
        graph = torch.fx.Graph()
        value = graph.placeholder("x")
        for target in targets:
            value = graph.call_function(target, (value,))
        graph.output(value)
        return torch.fx.GraphModule(torch.nn.Module(), graph)

    assert not _calls_custom_ops(graph_calling(aten.relu.default, aten.nonzero, torch.relu))
    assert _calls_custom_ops(graph_calling(aten.relu.default, torch.ops.paracompile.scale_grad.default))
    assert _calls_custom_ops(graph_calling(torch.ops.paracompile.scale_grad))
