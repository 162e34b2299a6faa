"""The runtime around a compiled multi-rank graph (paracompile/runtime.py), in one process: input names,
the call counts that decide which calls are checked, and the check itself on one rank of torch's fake
process group (its collectives return this rank's own values, as if every rank agreed)."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist

from paracompile.runtime import (CallCounts, RanksDisagreeError, describe_disagreement, readable_input_name,
                                 verify_same_on_every_rank)


@pytest.mark.parametrize("placeholder, readable", [
    ("L_latents_", "latents"), ("L_kwargs_timestep_", "timestep"),
    ("L_self_modules_blocks_modules_0_modules_qkv_parameters_weight_", "self.blocks.0.qkv.weight")])
def test_input_names_read_as_the_user_wrote_them(placeholder, readable):
    assert readable_input_name(placeholder) == readable


def test_call_counts_follow_the_model_object_not_its_address():
    counts = CallCounts()
    weight = torch.randn(4)
    assert [counts.next(weight, ("x",)) for _ in range(3)] == [0, 1, 2]
    assert counts.next(weight, ("x", "mask")) == 0, "another set of inputs counts on its own"
    del weight
    gc.collect()
    fresh = torch.randn(4)  # may take the freed tensor's memory; it is still a new model
    assert counts.next(fresh, ("x",)) == 0


@pytest.fixture
def one_rank_of_two():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_identical_inputs_pass_also_when_they_hold_nan_or_inf(one_rank_of_two):
    verify_same_on_every_rank([("latents", torch.randn(2, 3)), ("bad", torch.tensor([float("nan"), 1.0])),
                               ("huge", torch.tensor([float("inf")])), ("mask", torch.tensor([True, False]))])


def test_the_description_names_the_first_input_that_differs():
    mine = [("latents", (1, 4), "torch.float32", 2.0, 3.0), ("timestep", (1,), "torch.float32", 0.9, 0.9)]
    theirs = [("latents", (1, 4), "torch.float32", 2.0, 3.0), ("timestep", (1,), "torch.float32", 0.8, 0.8)]
    text = describe_disagreement([mine, theirs])
    assert "input 'timestep' (1,) holds other values on rank 1 than on rank 0 (sum 0.8 against 0.9)" in text
    shapes = describe_disagreement([mine, [("latents", (4, 1), "torch.float32", 2.0, 3.0)] + theirs[1:]])
    assert "input 'latents' has shape (1, 4) on rank 0 and (4, 1) on rank 1" in shapes
    names = describe_disagreement([mine, theirs[:1]])
    assert "rank 0 has inputs ['latents', 'timestep'] and rank 1 has ['latents']" in names
    assert issubclass(RanksDisagreeError, RuntimeError)



@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_inputs_are_fingerprinted_in_a_dtype_every_device_sums(dtype):
    """CUDA has no `abs` (nor `sum`) for float8 (a torchao float8 weight's data): the input check widens it to
    bfloat16 first, which keeps every float8 value."""
    from paracompile.runtime import arithmetic_view

    values = torch.tensor([-448.0 if dtype == torch.float8_e4m3fn else -57344.0, -1.5, 0.0, 0.125, 3.0, 240.0])
    float8 = values.to(dtype)
    widened = arithmetic_view(float8)
    assert widened.dtype == torch.bfloat16 and torch.equal(widened.float(), float8.float())
    assert arithmetic_view(torch.tensor([1, 2])).dtype == torch.float64
    if torch.cuda.is_available():
        arithmetic_view(float8.cuda()).abs().sum(dtype=torch.float64)
