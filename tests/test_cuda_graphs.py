"""CUDA graphs around a compiled step (paracompile/cuda_graphs.py): when it runs eagerly, captures and
replays, which inputs it copies, how many graphs it keeps, and when it refuses, checked on the CPU with a
stand-in capturer that records instead of capturing; the real capture runs where CUDA is (GPU only).
"""
from __future__ import annotations

import warnings
import weakref

import pytest
import torch

from paracompile.cuda_graphs import CudaGraphStep


class Step:
    """A compiled step stand-in: counts its executions (not the stand-in capture's recording run)."""

    def __init__(self):
        self.executions = 0
        self.recording = False

    def __call__(self, weight, x, scale):
        if not self.recording:
            self.executions += 1
        return (x @ weight * scale, x.sum())


class Recorder:
    """Stands in for a CUDA graph capture: records the step on its inputs; replaying runs it again on the
    same input tensors and writes into the recorded outputs, as a replay does."""

    def __init__(self, step: Step, fail: bool = False):
        self.step, self.fail, self.captures = step, fail, 0

    def __call__(self, function, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        self.step.recording = True
        try:
            outputs = function(*inputs)
        finally:
            self.step.recording = False

        def replay():
            for output, fresh in zip(outputs, function(*inputs)):
                output.copy_(fresh)

        return replay, outputs


def _warnings_of(call) -> tuple:
    """(call's result, the texts of the warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


def _graphed(step, recorder, max_graphs=8):
    return CudaGraphStep(step, weights={0}, name="the test step", max_graphs=max_graphs, capturer=recorder,
                         device_type="cpu")


def test_first_call_eager_second_captures_later_calls_replay_with_new_data():
    step = Step()
    recorder = Recorder(step)
    graphed = _graphed(step, recorder)
    weight = torch.randn(4, 3)
    for call in range(5):
        x = torch.randn(2, 4)
        expected = (x @ weight * 2.0, x.sum())
        output = graphed(weight, x, 2.0)
        assert torch.allclose(output[0], expected[0]) and torch.allclose(output[1], expected[1]), call
        assert step.executions == call + 1, "every call executes the step exactly once"
    assert recorder.captures == 1 and graphed.replays == 4


def test_outputs_are_copies_that_the_next_replay_does_not_overwrite():
    step = Step()
    graphed = _graphed(step, Recorder(step))
    weight = torch.randn(4, 3)
    graphed(weight, torch.randn(2, 4), 1.0)
    first_x, second_x = torch.randn(2, 4), torch.randn(2, 4)
    first = graphed(weight, first_x, 1.0)  # captured
    second = graphed(weight, second_x, 1.0)  # replayed
    assert torch.allclose(first[0], first_x @ weight), "a kept output changed when the graph replayed again"
    assert torch.allclose(second[0], second_x @ weight)


def test_a_new_signature_runs_eagerly_once_then_gets_its_own_graph_and_old_graphs_are_dropped():
    step = Step()
    recorder = Recorder(step)
    graphed = _graphed(step, recorder, max_graphs=2)
    weight = torch.randn(4, 3)
    for rows in (1, 2, 3):
        for _ in range(3):
            graphed(weight, torch.randn(rows, 4), 1.0)
    assert recorder.captures == 3 and len(graphed.graphs) == 2  # the graph for 1 row was dropped
    graphed(weight, torch.randn(1, 4), 1.0)  # seen before: captured again at once
    assert recorder.captures == 4
    # A Python number is part of the signature: another scale is another graph.
    graphed(weight, torch.randn(3, 4), 5.0)
    graphed(weight, torch.randn(3, 4), 5.0)
    assert recorder.captures == 5


def test_data_inputs_are_copied_in_and_new_weights_capture_anew():
    step = Step()
    recorder = Recorder(step)
    graphed = _graphed(step, recorder)
    weight, x = torch.randn(4, 3), torch.randn(2, 4)
    graphed(weight, x, 1.0)
    graphed(weight, x, 1.0)
    entry = next(iter(graphed.graphs.values()))
    assert list(entry.buffers) == [1], "the weight is read in place, only the data input has a buffer"
    other_weight = torch.randn(4, 3)
    output = graphed(other_weight, x, 1.0)  # a new signature: eager
    assert torch.allclose(output[0], x @ other_weight)
    graphed(other_weight, x, 1.0)
    assert recorder.captures == 2


class WeightsInTheMiddle:
    """A step whose weights sit between data inputs, as Dynamo orders a model's inputs and parameters."""

    def __init__(self):
        self.executions = 0

    def __call__(self, x, weight, bias, scale):
        self.executions += 1
        return ((x @ weight + bias) * scale,)


def _reference_data_ptr_check(tensors, data_ptrs, indices):
    """torch's C++ `_tensors_data_ptrs_at_indices_equal` (CUDA builds only), as cudagraph_trees calls it:
    `data_ptrs` is indexed by input position, like `tensors`."""
    return all(tensors[i].data_ptr() == data_ptrs[i] for i in indices)


@pytest.mark.parametrize("with_torch_check", [True, False], ids=["torch-cpp-check", "python-check"])
def test_weights_at_any_position_replay_without_capturing_again(monkeypatch, with_torch_check):
    monkeypatch.setattr(torch._C, "_tensors_data_ptrs_at_indices_equal",
                        _reference_data_ptr_check if with_torch_check else None, raising=False)
    step = WeightsInTheMiddle()
    recorder = Recorder(Step())  # records by calling the function it is given
    graphed = CudaGraphStep(step, weights={1, 2}, name="the test step", capturer=recorder, device_type="cpu")
    weight, bias = torch.randn(4, 3), torch.randn(3)
    for call in range(6):
        x = torch.randn(2, 4)
        assert torch.allclose(graphed(x, weight, bias, 2.0)[0], (x @ weight + bias) * 2.0), call
    assert recorder.captures == 1 and graphed.replays == 5, (recorder.captures, graphed.replays)
    moved = bias.clone()
    graphed(torch.randn(2, 4), weight, moved, 2.0)  # a weight moved: runs eagerly, then captures anew
    graphed(torch.randn(2, 4), weight, moved, 2.0)
    assert recorder.captures == 2


def test_a_cpu_input_turns_graphs_off_with_a_warning():
    step = Step()
    graphed = CudaGraphStep(step, weights={0}, name="the test step", capturer=Recorder(step), device_type="cuda")
    weight, x = torch.randn(4, 3), torch.randn(2, 4)
    graphed(weight, x, 1.0)
    output, texts = _warnings_of(lambda: graphed(weight, x, 1.0))
    assert torch.allclose(output[0], x @ weight)
    assert any("CUDA graphs are off for the test step: input 0 is a cpu tensor" in text for text in texts), texts
    assert graphed.disabled and graphed.replays == 0


def test_a_failed_capture_turns_graphs_off_with_a_warning_and_the_call_still_runs():
    step = Step()
    graphed = _graphed(step, Recorder(step, fail=True))
    weight, x = torch.randn(4, 3), torch.randn(2, 4)
    graphed(weight, x, 1.0)
    output, texts = _warnings_of(lambda: graphed(weight, x, 1.0))
    assert torch.allclose(output[0], x @ weight)
    assert any("capturing it failed (RuntimeError: operation not permitted" in text for text in texts), texts
    assert step.executions == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_capture_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).cuda()
    weights = {0, 1, 2, 3}

    def step(w1, b1, w2, b2, x):
        return (torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2),)

    graphed = CudaGraphStep(step, weights=weights, name="mlp")
    parameters = [p.detach() for p in model.parameters()]
    for _ in range(4):
        x = torch.randn(8, 64, device="cuda")
        assert torch.allclose(graphed(*parameters, x)[0], model(x), atol=1e-5)
    assert graphed.captures == 1 and graphed.replays == 3


# ----------------------------------------------------------------------------------------------
# The options


def test_reduce_overhead_means_paracompile_cuda_graphs_not_inductors():
    from paracompile.options import inductor_patches, parse_options

    options = parse_options({"mode": "reduce-overhead"})
    assert options.cuda_graphs
    assert inductor_patches(options)["triton.cudagraphs"] is False
    assert not parse_options({}).cuda_graphs
    forced = parse_options({"cuda_graphs": True, "inductor": {"triton.cudagraphs": True}})
    assert inductor_patches(forced)["triton.cudagraphs"] is True  # the user's own patches win


@pytest.mark.parametrize("value", [1, "yes", None])
def test_cuda_graphs_option_must_be_bool(value):
    from paracompile.options import parse_options

    with pytest.raises(ValueError, match="option 'cuda_graphs' must be bool"):
        parse_options({"cuda_graphs": value})


def test_cuda_graphs_on_cpu_tensors_warn_and_run_without_graphs():
    from tests.toy_dit import ToyDiT, toy_inputs

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT().eval()
    inputs = toy_inputs()
    compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "cuda_graphs": True})
    try:
        with torch.no_grad():
            output, texts = _warnings_of(lambda: compiled(**inputs))
            expected = model(**inputs)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(output, expected, atol=1e-5)
    assert any("cuda_graphs is on, but the graph takes no CUDA tensors" in text for text in texts), texts


def test_backward_through_cuda_graphs_raises_and_forward_with_grad_stays_exact():
    """On the CPU the graphs are off (a warning), but the step is still compiled forward-only: the same
    contract as on a GPU, where a replayed graph records no autograd history."""
    from tests.toy_dit import ToyDiT, toy_inputs

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ToyDiT()
    inputs = toy_inputs()
    compiled = torch.compile(model, backend="paracompile", options={"compiler": "eager", "cuda_graphs": True})
    try:
        output, _ = _warnings_of(lambda: compiled(**inputs))
        assert torch.allclose(output, model(**inputs), atol=1e-5)
        with pytest.raises(RuntimeError, match="backward through CUDA graphs"):
            output.sum().backward()
    finally:
        torch._dynamo.reset()


class HeldGraph:
    """What a captured graph holds on to (NCCL's reference to its communicator, in a real capture)."""


class RecorderWithHeldGraphs(Recorder):
    def __init__(self, step: Step):
        super().__init__(step)
        self.held: list = []

    def __call__(self, function, inputs):
        replay, outputs = super().__call__(function, inputs)
        held = HeldGraph()
        self.held.append(weakref.ref(held))

        def replay_holding_the_graph():
            assert held is not None
            replay()

        return replay_holding_the_graph, outputs


def test_destroy_process_group_releases_every_graph_first(tmp_path):
    """NCCL's communicator destroy waits until every graph that captured one of its collectives is gone
    (pytorch#115388): a script's `destroy_process_group()` would hang while compiled steps hold graphs."""
    import torch.distributed as dist

    step = Step()
    recorder = RecorderWithHeldGraphs(step)
    graphed = _graphed(step, recorder)
    weight, x = torch.randn(3, 3), torch.randn(2, 3)
    for _ in range(3):
        graphed(weight, x, 2.0)
    assert len(graphed.graphs) == 1 and all(ref() is not None for ref in recorder.held)

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    dist.destroy_process_group()
    assert graphed.graphs == {} and all(ref() is None for ref in recorder.held)
    assert dist.destroy_process_group.__name__ == "destroy_process_group"


def test_released_graphs_capture_anew_on_the_next_call():
    from paracompile import release_cuda_graphs

    step = Step()
    recorder = Recorder(step)
    graphed = _graphed(step, recorder)
    weight = torch.randn(3, 3)
    for _ in range(3):
        graphed(weight, torch.randn(2, 3), 2.0)
    assert recorder.captures == 1
    assert release_cuda_graphs() >= 1 and graphed.graphs == {}
    x = torch.randn(2, 3)
    product, _ = graphed(weight, x, 2.0)
    assert recorder.captures == 2 and torch.allclose(product, x @ weight * 2.0)
