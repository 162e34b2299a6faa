"""Options and mesh checking, error messages, fallbacks and the explain report.

Errors raised while compiling reach the caller wrapped by Dynamo in
`torch._dynamo.exc.BackendCompilerFailed` (the original is its `inner_exception`); the tests assert
on the message text, and call `parse_options` / `resolve_mesh` directly for the exception types.
The cases that need a process group run in one `run_on_ranks` call on 2 ranks.
"""
from __future__ import annotations

import io
import logging
import sys
import traceback
import warnings

import pytest
import torch
import torch.nn as nn

from paracompile.mesh import resolve_mesh
from paracompile.options import Options, parse_options
from tests.conftest import assert_matches, assert_ranks_match, run_compiled_vs_eager
from tests.multiprocess import RanksJob
from tests.toy_dit import ToyDiT, toy_inputs

# ----------------------------------------------------------------------------------------------
# parse_options, single process


def test_defaults():
    options = parse_options(None)
    assert options == Options()
    assert (options.mesh, options.threshold, options.compiler, options.mode, options.inductor, options.explain) == (
        "auto", 0.0, "inductor", None, {}, False)
    assert parse_options({}) == Options()


def test_valid_options_are_kept():
    raw = {"mesh": {"ulysses": 2}, "threshold": 0.05, "compiler": "eager", "mode": "max-autotune",
           "inductor": {"max_autotune": False}, "explain": True}
    options = parse_options(raw)
    assert options == Options(**raw)
    assert parse_options({"threshold": 1}).threshold == 1  # an int threshold is fine


@pytest.mark.parametrize("raw, message", [
    ({"meshes": "auto"}, r"unknown option\(s\) \['meshes'\]"),
    ({"compiler": "eager", "cache": True, "backend": 1}, r"unknown option\(s\) \['backend', 'cache'\]"),
    ({"threshold": "x"}, r"option 'threshold' must be int or float, got 'x'"),
    ({"threshold": True}, r"option 'threshold' must be int or float, got True"),
    ({"threshold": -0.1}, r"'threshold' must be >= 0"),
    ({"compiler": "tvm"}, r"option 'compiler' must be one of \['inductor', 'eager'\], got 'tvm'"),
    ({"compiler": 1}, r"option 'compiler' must be str"),
    ({"mode": 3}, r"option 'mode' must be str or NoneType"),
    ({"inductor": "max_autotune"}, r"option 'inductor' must be dict"),
    ({"explain": "yes"}, r"option 'explain' must be bool"),
    ({"explain": 1}, r"option 'explain' must be bool"),
])
def test_bad_options_raise_value_error(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_options(raw)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        parse_options({"treshold": 0.1})
    for name in ("mesh", "threshold", "compiler", "mode", "inductor", "explain"):
        assert repr(name) in str(info.value)


# ----------------------------------------------------------------------------------------------
# resolve_mesh without a process group, single process


@pytest.mark.parametrize("mesh, message", [
    ({"tensor": 2}, r"mesh dims \['tensor'\] are unknown"),
    ({"ulysses": 1, "pipeline": 1}, r"mesh dims \['pipeline'\] are unknown"),
    ({"ulysses": 0}, r"degree for 'ulysses' must be a positive int, got 0"),
    ({"ulysses": 2.0}, r"degree for 'ulysses' must be a positive int"),
    ({"ulysses": True}, r"degree for 'ulysses' must be a positive int"),
    ("ulysses", r"option 'mesh' must be 'auto'"),
    (2, r"option 'mesh' must be 'auto', a dict or a DeviceMesh; got int"),
    ({"ulysses": 2}, r"needs 2 ranks, but no process group is initialised"),
    ({"ring": 2}, r"needs 2 ranks, but no process group is initialised"),
    ({"batch": 2, "ulysses": 2}, r"needs 4 ranks, but no process group is initialised"),
])
def test_bad_mesh_without_process_group_raises_value_error(mesh, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh(mesh)


@pytest.mark.parametrize("mesh", ["auto", {}, {"ulysses": 1}, {"batch": 1, "ring": 1, "ulysses": 1}])
def test_single_process_mesh_is_one_rank(mesh):
    plan = resolve_mesh(mesh)
    assert plan.world_size == 1 and plan.ulysses is None
    assert plan.degrees == {"batch": 1, "ring": 1, "ulysses": 1}


# ----------------------------------------------------------------------------------------------
# The same errors through torch.compile, single process (Dynamo wraps them)


@pytest.mark.parametrize("options, message", [
    ({"treshold": 0.1}, r"unknown option\(s\) \['treshold'\]"),
    ({"compiler": "tvm"}, r"option 'compiler' must be one of"),
    ({"threshold": "x"}, r"option 'threshold' must be int or float"),
    ({"mesh": {"sequence": 2}}, r"mesh dims \['sequence'\] are unknown"),
    ({"mesh": {"ulysses": 2}}, r"needs 2 ranks, but no process group is initialised"),
])
def test_bad_options_fail_torch_compile(options, message):
    torch._dynamo.reset()
    compiled = torch.compile(nn.Linear(4, 4), backend="paracompile", options=options)
    try:
        with pytest.raises(Exception, match=message) as info:
            compiled(torch.randn(2, 4))
    finally:
        torch._dynamo.reset()
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


# ----------------------------------------------------------------------------------------------
# Cases that need 2 ranks: one run_on_ranks call, one entry per case


class NoAttention(nn.Module):
    """Tokens through an MLP: nothing for paracompile to parallelise."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, tokens):
        return self.mlp(tokens).softmax(dim=1)


def _error_info(error: BaseException) -> dict:
    inner = getattr(error, "inner_exception", None) or error
    return dict(type=type(error).__name__, inner_type=type(inner).__name__,
                inner_is_not_implemented=isinstance(inner, NotImplementedError),
                inner_is_value_error=isinstance(inner, ValueError), message=str(error),
                traceback=traceback.format_exc())


def _compile_error(model, call_inputs, options):
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend="paracompile", options=options)(**call_inputs)
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return _error_info(error)
    return None


def _toy(**model_kwargs):
    torch.manual_seed(0)
    return ToyDiT(**model_kwargs).eval()


def _case_mesh_product_mismatch(world_size):
    return _compile_error(_toy(), toy_inputs(), {"compiler": "eager", "mesh": {"ulysses": world_size + 1}})


def _case_batch_not_divisible(world_size):
    # toy_inputs() has batch 1, which a batch degree of 2 cannot split.
    return _compile_error(_toy(), toy_inputs(), {"compiler": "eager", "mesh": {"batch": world_size}})


def _case_device_mesh_ring(world_size):
    from torch.distributed.device_mesh import init_device_mesh

    torch._dynamo.reset()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ring",))
    return run_compiled_vs_eager(_toy(), toy_inputs(), {"compiler": "eager", "mesh": mesh}, record=False)


def _case_device_mesh_bad_dim_name(world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    return _compile_error(_toy(), toy_inputs(), {"compiler": "eager", "mesh": mesh})


def _case_explicit_ulysses_three_heads(world_size):
    return _compile_error(_toy(width=24, heads=3), toy_inputs(), {"compiler": "eager",
                                                                  "mesh": {"ulysses": world_size}})


def _case_auto_three_heads(world_size):
    torch._dynamo.reset()
    return run_compiled_vs_eager(_toy(width=24, heads=3), toy_inputs(), {"compiler": "eager", "mesh": "auto"},
                                 record=False)


def _case_no_attention(world_size):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NoAttention().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_compiled_vs_eager(model, {"tokens": torch.randn(2, 10, 8)}, {"compiler": "eager"},
                                       record=False)
    result["warnings"] = [(w.category, str(w.message)) for w in caught]
    return result


def _case_explain_with_app_logging(world_size):
    """explain=True in an application that configured logging with logging.basicConfig().

    Runs before `_case_explain`: once the report was emitted in a process, paracompile's logger has
    its own handler and level, and this case would pass for that reason alone."""
    torch._dynamo.reset()
    captured = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(captured)
    root.addHandler(handler)  # what logging.basicConfig(stream=...) does, level stays WARNING
    try:
        result = run_compiled_vs_eager(_toy(), toy_inputs(), {"compiler": "eager", "explain": True}, record=False)
    finally:
        root.removeHandler(handler)
    return dict(result=result, output=captured.getvalue())


def _case_explain(world_size):
    """explain=True with logging not configured: the report goes to stderr (captured here)."""
    torch._dynamo.reset()
    captured = io.StringIO()
    original, sys.stderr = sys.stderr, captured
    try:
        quiet = run_compiled_vs_eager(_toy(), toy_inputs(), {"compiler": "eager", "explain": False}, record=False)
        quiet_output = captured.getvalue()
        torch._dynamo.reset()
        loud = run_compiled_vs_eager(_toy(), toy_inputs(), {"compiler": "eager", "explain": True}, record=False)
        loud_output = captured.getvalue()[len(quiet_output):]
    finally:
        sys.stderr = original
    return dict(quiet=quiet, quiet_output=quiet_output, loud=loud, loud_output=loud_output)


CASES = {name[len("_case_"):]: function for name, function in list(globals().items()) if name.startswith("_case_")}


def _run_cases(rank, world_size, names):
    results = {}
    for name in names:
        try:
            value = CASES[name](world_size)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            value = dict(case_error=traceback.format_exc())
        results[name] = _strip(value)
    torch._dynamo.reset()
    return results


def _strip(value):
    if isinstance(value, dict):
        return {key: _strip(item) for key, item in value.items() if key != "compiled"}
    return value


TWO_RANKS = RanksJob(_run_cases, 2, list(CASES), timeout=600)


@pytest.fixture(scope="module")
def two_ranks():
    per_rank = TWO_RANKS.result()
    return {name: [ranks[name] for ranks in per_rank] for name in CASES}


def _errors(two_ranks, name):
    values = two_ranks[name]
    for value in values:
        assert not (isinstance(value, dict) and "case_error" in value), value.get("case_error")
    return values


@pytest.mark.slow
def test_mesh_product_must_equal_world_size(two_ranks):
    for error in _errors(two_ranks, "mesh_product_mismatch"):
        assert error is not None, "mesh {'ulysses': 3} on 2 ranks compiled"
        assert error["inner_is_value_error"], error["traceback"]
        assert "multiply to 3, but the world size is 2" in error["message"]


@pytest.mark.slow
def test_batch_the_degree_does_not_divide_is_an_error(two_ranks):
    for error in _errors(two_ranks, "batch_not_divisible"):
        assert error is not None, "mesh {'batch': 2} with batch 1 compiled"
        assert error["inner_is_value_error"], error["traceback"]
        assert "has batch size 1, which the batch mesh degree 2 does not divide" in error["message"]
        assert "scaled_dot_product_attention" in error["message"]


@pytest.mark.slow
def test_device_mesh_with_a_ring_dim(two_ranks):
    results = _errors(two_ranks, "device_mesh_ring")
    assert_ranks_match(results, "DeviceMesh ('ring',)")
    for result in results:
        assert "ring over 2 ranks" in result["explanations"][0]


@pytest.mark.slow
def test_device_mesh_with_unknown_dim_name(two_ranks):
    for error in _errors(two_ranks, "device_mesh_bad_dim_name"):
        assert error is not None and error["inner_is_value_error"], error
        assert "DeviceMesh's dims must be named among" in error["message"] and "tp" in error["message"]


@pytest.mark.slow
def test_explicit_ulysses_degree_must_divide_heads(two_ranks):
    for error in _errors(two_ranks, "explicit_ulysses_three_heads"):
        assert error is not None, "explicit {'ulysses': 2} with 3 heads compiled"
        assert error["inner_is_value_error"], error["traceback"]
        # Names the attention node, where it is, and the head count.
        assert "scaled_dot_product_attention" in error["message"] and "in blocks.0" in error["message"]
        assert "has 3 attention heads, which the Ulysses degree 2 does not divide" in error["message"]


@pytest.mark.slow
def test_auto_mesh_picks_ring_when_heads_do_not_divide(two_ranks):
    results = _errors(two_ranks, "auto_three_heads")
    assert_ranks_match(results, "3 heads, mesh auto")
    for result in results:
        report = result["explanations"][0]
        assert "mesh: batch 1, ring 2, ulysses 1 (auto: Ulysses 1 is the largest divisor" in report, report
        assert "ring over 2 ranks" in report and "replicated" not in report, report


@pytest.mark.slow
def test_model_without_attention_warns_and_matches(two_ranks):
    results = _errors(two_ranks, "no_attention")
    assert_ranks_match(results, "model without attention")
    for result in results:
        relevant = [(category, message) for category, message in result["warnings"] if "paracompile" in message]
        assert relevant, f"no paracompile warning among {result['warnings']}"
        category, message = relevant[0]
        assert issubclass(category, UserWarning)
        assert "no scaled_dot_product_attention" in message and "replicated" in message
        assert result["explanations"] == [] and result["graphs"] == []  # nothing rewritten


@pytest.mark.slow
def test_explain_logs_the_report(two_ranks):
    for value in _errors(two_ranks, "explain"):
        loud, quiet = value["loud"], value["quiet"]
        assert loud["error"] is None and quiet["error"] is None, (loud["error"], quiet["error"])
        assert_matches(loud["output"], loud["expected"], "explain=True output")
        # The report is kept either way; it is printed only with explain=True.
        assert len(loud["explanations"]) == 1 and len(quiet["explanations"]) == 1
        report = loud["explanations"][0]
        assert report.startswith("paracompile: world size 2") and "ulysses over 2 ranks" in report
        assert report in value["loud_output"], value["loud_output"]
        assert "paracompile: world size" not in value["quiet_output"]


@pytest.mark.slow
def test_explain_prints_even_when_the_application_configured_logging(two_ranks):
    for value in _errors(two_ranks, "explain_with_app_logging"):
        assert value["result"]["error"] is None, value["result"]["error"]
        assert "paracompile: world size 2" in value["output"]
