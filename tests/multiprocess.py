"""Run a test function on several ranks of a gloo process group, one process per rank.

Distributed code cannot be tested in a single process: each rank needs its own
process and the ranks must talk to each other. ``run_on_ranks`` starts
``world_size`` processes on this machine, joins them into a gloo process group
over loopback (127.0.0.1), runs the same function in each and returns what every
rank returned, in rank order::

    from tests.multiprocess import run_on_ranks

    def _sum_of_ranks(rank, world_size):
        value = torch.tensor([float(rank)])
        torch.distributed.all_reduce(value)
        return value

    def test_sum_of_ranks():
        assert [v.item() for v in run_on_ranks(_sum_of_ranks, 2)] == [1.0, 1.0]

How the children find the function
-----------------------------------
Processes are started with the "spawn" method (a fresh interpreter, no fork),
because forking a process that already initialised torch's thread pools is
unsafe. A spawned child receives the function *by name* (module and qualified
name), so the function must be defined at module level, not inside a test or a
lambda, and its module must be importable in the child.

``tests/`` is a package (it has an empty ``__init__.py``). With pytest's default
import mode ("prepend"), ``python -m pytest tests`` run from the repository root
imports test files as ``tests.test_something`` and puts the repository root on
``sys.path``; the spawn method copies the parent's ``sys.path`` into each child,
so the child can import ``tests.test_something`` and find the function. Import
helpers in test files as ``from tests.multiprocess import run_on_ranks`` (a bare
``import multiprocess`` could pick up the unrelated PyPI package of that name).
``--import-mode=importlib`` is not supported: it does not make test modules
importable by name.

What each rank gets
-------------------
* ``torch.distributed`` initialised with the gloo backend, ``rank`` and
  ``world_size``, through ``tcp://127.0.0.1:<free port>``;
* ``torch.manual_seed(0)``, so every rank draws the same random numbers;
* one intra-op and one inter-op thread, so that two ranks fit on a two-core
  machine without oversubscription.

What comes back
---------------
Return values travel back as plain pickled bytes through a pipe, never through
shared memory, so the child can exit as soon as it has sent them. Tensors
(also inside lists, tuples and dicts) are detached, moved to the CPU and cloned
first, so views and tensors that require gradients are safe to return.

If a rank raises, its full traceback text is sent back through the same pipe
(and also printed to its stderr), so it reaches the parent even when pytest
captures or loses the children's output. ``run_on_ranks`` then raises
``RankFailure`` (a ``RuntimeError``) naming the rank and containing that text.
A rank that dies without a word (a crash, ``os._exit``) is reported with its
exit code. After the first failure the other ranks get a few seconds to report
their own errors, then they are killed, so a rank stuck in a collective waiting
for a dead peer cannot hang the test run. The whole call is bounded by
``timeout`` seconds.

A rank that sent its result and then died on the way out (an abort at
interpreter exit) goes unnoticed by default; with ``check_exit_codes=True`` every
rank must also exit with status 0, or ``RankFailure`` names its exit code.

Worlds are reused
-----------------
Starting a rank (a fresh interpreter importing torch and diffusers, then joining
the group) takes 8-13 seconds on the 2-core CI machine, and the suite runs about
forty worlds. So by default the ranks of a world stay alive after a call and the
next call of the same world size runs in them: the processes, the imports and the
gloo group are reused; nothing else is. Before every call each rank resets
Dynamo (``torch._dynamo.reset()``), re-seeds with ``torch.manual_seed(0)`` and
empties paracompile's registry of reports; after it, the rank puts back the
environment variables, grad mode, default dtype, warning filters, root logging
handlers and standard streams the call may have changed. A world whose call
failed or timed out, or that destroyed its process group, is stopped (a peer may
be stuck in a collective) and the next call starts a new one; so is a world whose
ranks grew past ``_RECYCLE_BYTES`` of memory. ``fresh=True`` (implied by
``check_exit_codes``) runs in new processes that exit afterwards: for what must
start from a new interpreter, such as a cache directory read at the first
compile, or how a process exits. Setting ``PARACOMPILE_TEST_FRESH_WORLDS=1``
makes every call fresh, to rule the reuse out when a test fails.

Calls run ahead
---------------
A test module names its world calls at import, as ``RanksJob`` values
(``WORLD2 = RanksJob(_run, 2, timeout=900)``; its fixture returns
``WORLD2.result()``), recorded under the module that defines their function.
``tests/conftest.py`` plans the jobs of the modules with selected slow tests,
in the order they run (``plan_run_ahead``), and before each
test starts the next one in the background if no world is busy (``run_ahead``):
while the test process runs tests of its own, which keep one core busy, the
ranks use the other. A call finds the results of its job ready or waits for
them; a failure is raised by the call, as it would have been. A call of another
job on that world first collects the one running ahead, which keeps its outcome
for its own call. One job runs ahead at a time. ``PARACOMPILE_TEST_RUN_AHEAD=0``
turns it off (so does ``PARACOMPILE_TEST_FRESH_WORLDS=1``).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import pickle
import socket
import sys
import time
import traceback
import warnings
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["RankFailure", "RanksJob", "plan_run_ahead", "run_ahead", "run_on_ranks"]

# After one rank failed, how long the others may take to report their own
# failure (often the more telling one) before they are killed.
FAILURE_GRACE_SECONDS = 10.0

# How long a rank that already sent its result may take to exit before it is killed.
EXIT_GRACE_SECONDS = 30.0

# Gloo picks its network interface from the host name by default, which in
# containers can resolve to an address that is not reachable; pin loopback.
_LOOPBACK_INTERFACE = "lo0" if sys.platform == "darwin" else "lo"

# A reused world's ranks retire (send their last result, then exit) once one of
# them holds more than this much resident memory: compiled models leave
# allocator fragments behind, and the idle ranks of a 2- and a 4-rank world
# share the CI machine's memory with the running ones.
_RECYCLE_BYTES = 2 << 30

# A reused world's gloo timeout: the parent bounds each call by its own timeout
# and stops the world when a call runs over, so this only has to be long.
_REUSED_GROUP_TIMEOUT = 3600

# What the parent sends a reused rank to make it leave its loop and exit.
_STOP = b"stop"

# How many times to retry with a new port when another process took the free
# port between choosing it and binding it.
_PORT_ATTEMPTS = 3


class RankFailure(RuntimeError):
    """One or more ranks raised, crashed or did not finish in time."""


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    check_exit_codes: bool = False,
    fresh: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks.

    Returns the ranks' return values in rank order. Raises ``RankFailure`` with
    the rank number and the remote traceback if any rank fails, or if the ranks
    do not all finish within ``timeout`` seconds; with ``check_exit_codes``, also
    when a rank that sent its result exits with another status than 0. The call
    runs in the ranks of the last world of this size unless ``fresh`` (see
    "Worlds are reused" above).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    reuse = not (fresh or check_exit_codes or _fresh_worlds_only())
    for attempt in range(_PORT_ATTEMPTS):
        try:
            if reuse:
                job = _Job(fn, world_size, args, kwargs, timeout)
                started_ahead = _outcome_of_started(job)
                if started_ahead is not None:
                    return started_ahead.value()
                return _reused_world(world_size).call(job)
            return _launch(fn, world_size, args, kwargs, timeout, check_exit_codes)
        except RankFailure as failure:
            port_was_taken = "address already in use" in str(failure).lower()
            if not port_was_taken or attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _launch(fn, world_size, args, kwargs, timeout, check_exit_codes=False) -> list[Any]:
    """Start one process per rank, collect one message from each, clean up."""
    context = get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_find_free_port()}"
    processes = []
    receivers: dict[Connection, int] = {}
    reported_ranks: set[int] = set()
    try:
        for rank in range(world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                args=(fn, rank, world_size, init_method, timeout, sender, args, kwargs),
                name=f"rank-{rank}",
                daemon=True,
            )
            process.start()
            # Keep only the reading end here: once the child exits, its writing
            # end closes and the reader sees end-of-file instead of waiting forever.
            sender.close()
            processes.append(process)
            receivers[receiver] = rank
        results, failures = _collect(receivers, processes, timeout, reported_ranks)
    finally:
        _stop(processes, reported_ranks)
        for receiver in receivers:
            receiver.close()

    if failures:
        raise _failure(fn, world_size, failures)
    exits = {rank: process.exitcode for rank, process in enumerate(processes) if process.exitcode != 0}
    if check_exit_codes and exits:
        raise RankFailure(f"run_on_ranks({getattr(fn, '__qualname__', fn)!r}): every rank sent its result, but "
                          + ", ".join(f"rank {rank} then exited with code {code}" for rank, code in exits.items())
                          + " (a negative code is the signal that ended it: -6 is SIGABRT)")
    return [results[rank] for rank in range(world_size)]


def _failure(fn, world_size: int, failures: dict[int, str]) -> RankFailure:
    # Failures are listed in the order they arrived: the first one is usually
    # the cause, later ones often just peers losing their connection.
    first_rank = next(iter(failures))
    timed_out = failures[first_rank].startswith("did not finish")
    report = "\n\n".join(
        f"rank {rank} of {world_size} failed"
        f"{' first' if rank == first_rank and not timed_out else ''}:\n{text}"
        for rank, text in failures.items()
    )
    return RankFailure(f"run_on_ranks({getattr(fn, '__qualname__', fn)!r}) failed\n\n{report}")


def _collect(receivers: dict[Connection, int], processes, timeout: float, reported_ranks: set[int],
             retiring: Optional[set[int]] = None, timeout_text: Optional[float] = None):
    """Wait for one message per rank; stop waiting soon after some rank has failed.

    Adds every rank that sent a message (or exited) to ``reported_ranks``, and
    every rank of a reused world that sent its last result to ``retiring``.
    """
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}  # In order of arrival.
    pending = dict(receivers)
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        ready = wait(list(pending), timeout=deadline - now)
        for receiver in ready:
            rank = pending.pop(receiver)
            reported_ranks.add(rank)
            try:
                kind, payload = pickle.loads(receiver.recv_bytes())
            except EOFError:
                processes[rank].join(timeout=5)
                failures[rank] = (
                    f"the process exited with code {processes[rank].exitcode} "
                    "without sending a result or a traceback (crashed or killed?)"
                )
                continue
            if kind in ("result", "last result"):
                results[rank] = pickle.loads(payload)
                if kind == "last result" and retiring is not None:
                    retiring.add(rank)
            else:
                failures[rank] = payload
        if failures:
            # Give the other ranks a short, bounded time to report too.
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_SECONDS)
    timed_out = not failures
    for rank in sorted(pending.values()):
        if timed_out:
            failures[rank] = f"did not finish within {timeout_text or timeout} seconds; killed"
        else:
            failures[rank] = "killed while still running, after another rank had failed"
    return results, failures


def _stop(processes, reported_ranks: set[int], grace: float = EXIT_GRACE_SECONDS) -> None:
    """Let ranks that reported exit on their own; terminate, then kill, the rest."""
    deadline = time.monotonic() + grace
    for rank in sorted(reported_ranks):
        processes[rank].join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def _find_free_port() -> int:
    """Ask the operating system for a TCP port that is free right now on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _ReusedWorld:
    """``world_size`` long-lived ranks in one gloo group, running one call at a time (see "Worlds are reused")."""

    def __init__(self, world_size: int):
        context = get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_find_free_port()}"
        self.world_size = world_size
        self.processes = []
        self.connections: list[Connection] = []
        self.usable = True
        self.running: Optional[_Job] = None  # the job sent and not yet collected
        self.deadline = 0.0
        for rank in range(world_size):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(target=_reused_rank_main, args=(rank, world_size, init_method, child_end),
                                      name=f"rank-{rank}", daemon=True)
            process.start()
            child_end.close()
            self.processes.append(process)
            self.connections.append(parent_end)

    def call(self, job: "_Job") -> list[Any]:
        self.start(job)
        return self.finish()

    def start(self, job: "_Job") -> None:
        """Send `job` to every rank without waiting for it (the world must be idle)."""
        assert self.running is None, "a reused world runs one call at a time"
        self.running, self.deadline = job, time.monotonic() + job.timeout
        try:
            for connection in self.connections:
                try:
                    connection.send_bytes(job.message)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a rank that died is reported by _collect as exited without a result
        except BaseException:
            self.running = None
            self.close()  # some ranks may hold the job and others not
            raise

    def finish(self) -> list[Any]:
        """Wait for the running job's results (bounded by its own timeout, counted from its start)."""
        job, self.running = self.running, None
        try:
            retiring: set[int] = set()
            results, failures = _collect({c: rank for rank, c in enumerate(self.connections)}, self.processes,
                                         max(1.0, self.deadline - time.monotonic()), set(), retiring,
                                         timeout_text=job.timeout)
        except BaseException:
            # Results left unread in the pipes would be taken for the next call's.
            self.close()
            raise
        if failures or retiring:
            self.close()
        if failures:
            raise _failure(job.fn, self.world_size, failures)
        return [results[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        self.usable = False
        for connection in self.connections:
            try:
                connection.send_bytes(_STOP)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        _stop(self.processes, set(range(self.world_size)), grace=5.0)
        for connection in self.connections:
            connection.close()


_reused_worlds: dict[int, _ReusedWorld] = {}


def _reused_world(world_size: int) -> _ReusedWorld:
    world = _reused_worlds.get(world_size)
    if world is None or not world.usable or not all(process.is_alive() for process in world.processes):
        if world is not None:
            world.close()
        world = _reused_worlds[world_size] = _ReusedWorld(world_size)
    return world


@atexit.register
def _close_reused_worlds() -> None:
    for world in _reused_worlds.values():
        world.close()
    _reused_worlds.clear()


# ---------------------------------------------------------------------------
# Running ahead: a world's call started in the background while the test process works alone.
# ---------------------------------------------------------------------------


class _Job:
    """One reused-world call: what the ranks receive, and the key a later identical call finds it by."""

    def __init__(self, fn, world_size: int, args: tuple, kwargs: dict, timeout: float):
        self.fn, self.world_size, self.timeout = fn, world_size, timeout
        self.message = pickle.dumps((fn, args, kwargs))
        self.key = (world_size, self.message)


class _Outcome:
    """What a job that ran ahead gave: the ranks' results, or the failure to raise."""

    def __init__(self, results: Optional[list] = None, failure: Optional[BaseException] = None):
        self.results, self.failure = results, failure

    def value(self) -> list[Any]:
        if self.failure is not None:
            raise self.failure
        return self.results


class RanksJob:
    """A `run_on_ranks(fn, world_size, *args, timeout=..., **kwargs)` call a test module makes at import (a
    module-level value, or one in a module-level dict or list), recorded under the module that defines `fn`,
    so that the suite can start it ahead (tests/conftest.py): while the test process runs
    tests of its own (one core), the ranks compute in the background on the other, and `result()` then finds
    the results ready, or waits for them. Run ahead or not, `result()` returns what run_on_ranks returns and
    raises what it raises; the world's call is the same (`PARACOMPILE_TEST_RUN_AHEAD=0` turns running ahead
    off)."""

    def __init__(self, fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300, **kwargs: Any):
        self.fn, self.world_size, self.args, self.timeout, self.kwargs = fn, world_size, args, timeout, kwargs
        _run_ahead.named.setdefault(fn.__module__, []).append(self)

    def result(self) -> list[Any]:
        return run_on_ranks(self.fn, self.world_size, *self.args, timeout=self.timeout, **self.kwargs)

    def job(self) -> _Job:
        return _Job(self.fn, self.world_size, self.args, self.kwargs, self.timeout)


class _RunAhead:
    """The jobs the selected tests will ask for, in the order they will (plan), and the outcomes of those that
    ran ahead, until asked for. One job runs ahead at a time, on top of the test process: two saturated cores
    share the work of three processes, not of five."""

    def __init__(self):
        self.named: dict[str, list[RanksJob]] = {}  # module name -> its jobs, in the order it made them
        self.planned: list[_Job] = []
        self.started: set = set()
        self.outcomes: dict = {}


_run_ahead = _RunAhead()


def plan_run_ahead(modules: list[str]) -> None:
    """Plan the jobs of these test modules (by name, in the order they run) to start ahead (tests/conftest.py)."""
    _run_ahead.planned = [job.job() for module in modules for job in _run_ahead.named.get(module, [])]
    _run_ahead.started.clear()


def run_ahead() -> None:
    """Start the next planned job no call has taken yet, unless a world is busy (running ahead, or a call)."""
    if _fresh_worlds_only() or os.environ.get("PARACOMPILE_TEST_RUN_AHEAD") == "0":
        return
    for world_size, world in list(_reused_worlds.items()):
        # A job that finished is collected now: one nobody asks for (its tests deselected) must not keep
        # the machine marked busy for the rest of the session.
        if world.running is not None and all(connection.poll() for connection in world.connections):
            _settle(world_size)
    if any(world.running is not None for world in _reused_worlds.values() if world.usable):
        return
    for job in _run_ahead.planned:
        if job.key not in _run_ahead.started:
            _run_ahead.started.add(job.key)
            _reused_world(job.world_size).start(job)
            return


def _outcome_of_started(job: _Job) -> Optional[_Outcome]:
    """The outcome of `job` if it ran ahead (waiting for it if it still runs); None if it did not. Taken once:
    asked for again, the job runs again, as it would without running ahead."""
    _settle(job.world_size)
    _run_ahead.started.add(job.key)
    return _run_ahead.outcomes.pop(job.key, None)


def _settle(world_size: int) -> None:
    """Collect the job running ahead in this world size's ranks, if any, and keep its outcome for its own call:
    a world runs one call at a time."""
    world = _reused_worlds.get(world_size)
    if world is None or world.running is None:
        return
    key = world.running.key
    try:
        _run_ahead.outcomes[key] = _Outcome(results=world.finish())
    except Exception as failure:  # raised by the job's own call, not by whichever call collected it
        _run_ahead.outcomes[key] = _Outcome(failure=failure)


def settle_running() -> None:
    """Collect every job running ahead; each one's outcome waits for its own call."""
    for world_size in list(_reused_worlds):
        _settle(world_size)


def _fresh_worlds_only() -> bool:
    return os.environ.get("PARACOMPILE_TEST_FRESH_WORLDS") == "1"


# ---------------------------------------------------------------------------
# Code below runs in the spawned child processes.
# ---------------------------------------------------------------------------


def _rank_main(fn, rank, world_size, init_method, timeout, sender, args, kwargs) -> None:
    """Entry point of one rank: set up, run ``fn``, send back its result or traceback."""
    try:
        _set_up_rank(rank, world_size, init_method, timeout)
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor data into the bytes (no shared memory), so
        # the result stays valid after this process exits.
        message = ("result", pickle.dumps(_detached(result)))
    except BaseException:
        message = _error_message(rank)
    # Send before tearing down the process group, so nothing that might hang
    # during teardown can hold the message back.
    sender.send_bytes(pickle.dumps(message))
    sender.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    if message[0] == "error":
        sys.exit(1)


def _error_message(rank) -> tuple[str, str]:
    """The message for the exception being handled: its traceback, also printed to this rank's stderr."""
    text = traceback.format_exc()
    print(f"[rank {rank}] {text}", file=sys.stderr, flush=True)
    return "error", text


def _reused_rank_main(rank, world_size, init_method, connection) -> None:
    """Entry point of one rank of a reused world: set up once, then run calls until told to stop."""
    try:
        _set_up_rank(rank, world_size, init_method, _REUSED_GROUP_TIMEOUT)
    except BaseException:
        connection.send_bytes(pickle.dumps(_error_message(rank)))
        sys.exit(1)
    world_group = dist.group.WORLD
    failed = False
    while not failed:
        try:
            job = connection.recv_bytes()
        except EOFError:
            break
        if job == _STOP:
            break
        kind, payload = _run_call(rank, world_size, job)
        failed = kind == "error"
        group_kept = dist.is_initialized() and dist.group.WORLD is world_group
        retire = failed or not group_kept or _resident_bytes() > _RECYCLE_BYTES
        if retire and not failed:
            kind = "last result"
        connection.send_bytes(pickle.dumps((kind, payload)))
        if retire:
            break
    connection.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass
    if failed:
        sys.exit(1)


def _run_call(rank, world_size, job: bytes) -> tuple[str, Any]:
    """Run one call as a new rank would: seeded, Dynamo's counters and paracompile's registry empty, Dynamo
    reset (every call ends with the reset, so the next one starts from it), with what it changes in the
    process put back."""
    saved = _ProcessState()
    try:
        fn, args, kwargs = pickle.loads(job)
        torch._dynamo.utils.counters.clear()
        backend = sys.modules.get("paracompile.backend")
        if backend is not None:
            backend.explanations.clear()
            backend.rewritten_graphs.clear()
        torch.manual_seed(0)
        result = fn(rank, world_size, *args, **kwargs)
        return "result", pickle.dumps(_detached(result))
    except BaseException:
        return _error_message(rank)
    finally:
        saved.restore()
        torch._dynamo.reset()
        freeze_survivors()


class _ProcessState:
    """What a call may change in its process and a new rank would not see: saved, then put back."""

    def __init__(self):
        self.environ = dict(os.environ)
        self.grad_enabled = torch.is_grad_enabled()
        self.default_dtype = torch.get_default_dtype()
        self.warning_filters = list(warnings.filters)
        root = logging.getLogger()
        self.root_handlers, self.root_level = list(root.handlers), root.level
        self.streams = sys.stdout, sys.stderr

    def restore(self) -> None:
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        torch.set_grad_enabled(self.grad_enabled)
        torch.set_default_dtype(self.default_dtype)
        warnings.filters[:] = self.warning_filters
        getattr(warnings, "_filters_mutated", lambda: None)()  # the filters' caches see the change
        root = logging.getLogger()
        root.handlers[:] = self.root_handlers
        root.setLevel(self.root_level)
        sys.stdout, sys.stderr = self.streams


def _resident_bytes() -> int:
    """This process's resident memory (Linux); 0 where /proc cannot tell, so the world is never recycled there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_up_rank(rank, world_size, init_method, timeout) -> None:
    """Limit threads, seed the random generators and join the process group."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # Only allowed before any inter-op work; harmless to skip.
    torch.manual_seed(0)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _LOOPBACK_INTERFACE)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    freeze_survivors()


def freeze_survivors() -> None:
    """Collect garbage, then move every surviving object into the collector's permanent generation
    (`gc.freeze`). A rank holds about half a million long-lived objects (torch, diffusers, sympy, what Dynamo
    keeps), and each full collection, automatic ones while Dynamo traces as well as this one, would walk all
    of them again: 0.35 s a time here. Frozen, a collection walks only what was made since: the whole suite's
    user CPU time fell by about 15% (1,659 s to 1,403 s). Frozen objects that die later are still freed by
    reference counting; only a reference cycle among them is kept, which a test process can afford."""
    gc.collect()
    gc.freeze()


def _detached(value: Any) -> Any:
    """Copy tensors out of autograd and off any device, also inside containers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_detached(item) for item in value]
    if isinstance(value, tuple):
        items = [_detached(item) for item in value]
        # Named tuples take their fields as separate arguments.
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value
