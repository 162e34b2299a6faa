"""Tests of tests/multiprocess.py, the helper that runs a function on several ranks.

The functions handed to ``run_on_ranks`` live at module level because spawned
processes import them by name.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiprocess import RankFailure, run_on_ranks

pytestmark = pytest.mark.slow  # every test here spawns process groups


def _all_reduce_rank_plus_one(rank, world_size):
    value = torch.tensor([float(rank + 1)], requires_grad=False)
    dist.all_reduce(value)
    # Same seed on every rank, so the same random numbers.
    return {"sum": value, "random": torch.rand(3), "world_size": dist.get_world_size()}


def test_all_reduce_sums_over_two_ranks_and_seeds_alike():
    results = run_on_ranks(_all_reduce_rank_plus_one, 2)

    assert len(results) == 2
    for result in results:
        assert result["sum"].item() == 3.0
        assert result["world_size"] == 2
    assert torch.equal(results[0]["random"], results[1]["random"])


def _raise_on_rank_one(rank, world_size, message):
    if rank == 1:
        raise ValueError(message)
    return rank


def test_rank_that_raises_reports_rank_and_traceback():
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(_raise_on_rank_one, 2, "deliberate failure from the test")

    text = str(failure.value)
    assert "rank 1 of 2 failed first" in text
    assert "ValueError: deliberate failure from the test" in text
    assert "Traceback" in text and "_raise_on_rank_one" in text
    assert "rank 0 of 2 failed" not in text


def _rank_one_crashes_while_rank_zero_waits(rank, world_size):
    if rank == 1:
        os._exit(7)  # Dies without a traceback, like a segmentation fault would.
    dist.all_reduce(torch.ones(1))  # Never completes: rank 1 is gone.


def test_crashed_rank_does_not_hang_the_others():
    from tests.multiprocess import settle_running

    settle_running()  # a call running ahead in the world is not this test's time
    started = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 of 2 failed") as failure:
        run_on_ranks(_rank_one_crashes_while_rank_zero_waits, 2, timeout=120)

    assert "exited with code 7" in str(failure.value)
    assert time.monotonic() - started < 60


def _change_the_process(rank, world_size):
    """Leave behind what a test might: an environment variable, grad mode off, another default dtype."""
    os.environ["PARACOMPILE_TEST_LEFTOVER"] = "1"
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    return os.getpid()


def _look_at_the_process(rank, world_size):
    value = torch.tensor([1.0])
    dist.all_reduce(value)  # the reused group still works
    return dict(pid=os.getpid(), leftover=os.environ.get("PARACOMPILE_TEST_LEFTOVER"),
                grad=torch.is_grad_enabled(), dtype=torch.get_default_dtype(), sum=value.item(),
                random=torch.rand(2))


def test_a_reused_world_runs_in_the_same_processes_and_puts_back_what_a_call_changed():
    first = run_on_ranks(_change_the_process, 2)
    second = run_on_ranks(_look_at_the_process, 2)
    assert [result["pid"] for result in second] == first
    for result in second:
        assert result["leftover"] is None and result["grad"] and result["dtype"] == torch.float32
        assert result["sum"] == 2.0
    # Seeded before every call, as a new rank would be.
    assert torch.equal(second[0]["random"], torch.manual_seed(0) and torch.rand(2))


def test_a_world_whose_call_failed_is_replaced_and_fresh_runs_apart():
    before = [result["pid"] for result in run_on_ranks(_look_at_the_process, 2)]
    with pytest.raises(RankFailure):
        run_on_ranks(_raise_on_rank_one, 2, "deliberate failure from the test")
    after = [result["pid"] for result in run_on_ranks(_look_at_the_process, 2)]
    fresh = [result["pid"] for result in run_on_ranks(_look_at_the_process, 2, fresh=True)]
    again = [result["pid"] for result in run_on_ranks(_look_at_the_process, 2)]
    assert not set(after) & set(before), "a world whose call failed is stopped; the next call gets new ranks"
    assert not set(fresh) & set(after) and again == after


def _square_of_rank_plus(rank, world_size, offset):
    return (rank + offset) ** 2


def test_a_job_run_ahead_returns_or_raises_what_its_call_would(monkeypatch):
    """RanksJob (tests/conftest.py starts them ahead): a job started in the background gives its own call the
    results, or the failure, it would have given; a call of another job on that world first collects it."""
    from tests import multiprocess

    monkeypatch.delenv("PARACOMPILE_TEST_RUN_AHEAD", raising=False)
    monkeypatch.delenv("PARACOMPILE_TEST_FRESH_WORLDS", raising=False)
    multiprocess.settle_running()
    plan = multiprocess._run_ahead
    saved = list(plan.planned), set(plan.started), plan.named.pop(__name__, None)
    squares, failing = (multiprocess.RanksJob(_square_of_rank_plus, 2, 1),
                        multiprocess.RanksJob(_raise_on_rank_one, 2, "deliberate failure ahead"))
    try:
        multiprocess.plan_run_ahead([__name__])
        assert [job.key for job in plan.planned] == [squares.job().key, failing.job().key]
        multiprocess.run_ahead()
        assert multiprocess._reused_worlds[2].running.key == squares.job().key
        multiprocess.run_ahead()  # one job at a time: the second waits
        assert multiprocess._reused_worlds[2].running.key == squares.job().key
        assert run_on_ranks(_look_at_the_process, 2)[0]["sum"] == 2.0  # collects the squares first
        multiprocess.run_ahead()
        assert multiprocess._reused_worlds[2].running.key == failing.job().key
        assert squares.result() == [1, 4]
        with pytest.raises(RankFailure, match="deliberate failure ahead"):
            failing.result()
        assert not {squares.job().key, failing.job().key} & set(multiprocess._run_ahead.outcomes)
        assert squares.result() == [1, 4]  # asked again, it runs again
    finally:
        multiprocess.settle_running()
        plan.planned, plan.started, named = saved
        plan.named.pop(__name__, None)
        if named is not None:
            plan.named[__name__] = named
