"""A rank that ran a compiled model shuts down cleanly: `destroy_process_group()` frees the process group (its
gloo threads end before the interpreter's teardown), and every rank of every short-lived world exits with
status 0.

Why it needs checking: torch.distributed.nn.functional declares `group=group.WORLD` defaults, evaluated at
its import; torch.compile imports it (through torch._dynamo) at its first call, after init_process_group, so
those defaults held the default group and `destroy_process_group()` could not free it. Its gloo threads (the
TCP loop, the worker run-loops, the store's loop) then ran into interpreter teardown, the state in which gloo
threads can abort a process; issue 14's survey saw ranks abort at exit after correct results ("terminate
called without an active exception", twice in 60 two-rank runs of Flux2 and ConsisID). paracompile/mesh.py
releases those defaults. Each world here is a fresh pair of spawned interpreters, as torchrun starts them, and
each rank checks that torch._dynamo was first imported after its process group was made (the order that
pinned it). The thread check fails without the release on every run; the exit codes catch an abort whatever
its cause.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from tests.conftest import assert_ranks_match
from tests.multiprocess import run_on_ranks

pytestmark = [pytest.mark.slow,  # every test here spawns process groups
              pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")]

WORLDS = 2  # the thread check fails in every world without the release; the exit codes catch a rare abort
# The threads of a gloo process group and of its TCP store.
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop", "pt_tcpstore_uv")


def _thread_names() -> list[str]:
    names = []
    for thread in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{thread}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended while we looked
            pass
    return names


def _compile_run_destroy(rank, world_size):
    from tests.toy_dit import ToyDiT, toy_inputs

    dynamo_after_init = "torch._dynamo" not in sys.modules  # torch.compile imports it below
    model = ToyDiT(depth=1).eval()
    inputs = toy_inputs()
    with torch.no_grad():
        expected = model(**inputs)
        output = torch.compile(model, backend="paracompile", options={"compiler": "eager", "mesh": {"ulysses": 2}})(
            **inputs)
    dist.destroy_process_group()
    left = [name for name in _thread_names() if name in GROUP_THREADS]
    return dict(error=None, expected=expected, output=output, dynamo_after_init=dynamo_after_init, left=left)


def test_short_lived_worlds_free_their_process_group_and_exit_cleanly():
    for world in range(WORLDS):
        ranks = run_on_ranks(_compile_run_destroy, 2, timeout=300, check_exit_codes=True)
        assert_ranks_match(ranks, f"world {world}")
        for rank, result in enumerate(ranks):
            assert result["dynamo_after_init"], "torch._dynamo was imported before the process group was made"
            assert not result["left"], (f"world {world}, rank {rank}: threads of the destroyed process group are "
                                        f"still running: {result['left']}")
