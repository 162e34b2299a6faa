"""CUDA graphs around a compiled step, its collectives included.

Invariant: every call executes the step's kernels exactly once, collectives included, whether it runs
eagerly, captures or replays (a capture records kernels and executes none, NCCL's included; the replay
after it executes them). So whatever one rank's compiles, recompiles and captures did, every rank executes
the same collectives in the same order, and a rank that captures while the others replay cannot hang them.

Policy, per compiled step (one graph of Dynamo's, or one part of First Block Cache's split):
- the first call with a new input signature runs eagerly: it compiles, autotunes and sets up the NCCL
  communicators, none of which may happen inside a capture;
- the second call with that signature captures the step into a CUDA graph, then replays it;
- later calls copy their data inputs into the graph's input buffers (skipped where the caller passes the
  buffer itself), replay, and return copies of the outputs (a replay overwrites the graph's own outputs,
  and a caller may keep the last output, as classifier-free guidance does with its cond output);
- the signature of a call: every data input's shape, strides, dtype and device, and every Python number;
  the weights are read in place, so a graph also checks that every weight still has the address it was
  captured with (one C++ call for all of them where torch has it: a model has a thousand weights, and a
  Python loop over them costs a millisecond per call) and captures anew when one moved;
- at most `max_graphs` graphs per step: past that the least recently used one goes, and its memory with it;
- a step that cannot be graphed runs eagerly from then on, with one warning that says why: an input on
  the CPU (a Python float that Dynamo lifted into a tensor would be frozen into the graph: pass it as a
  tensor on the GPU), or a capture that failed (an op that synchronises with the host, say).

Each graph has its own memory pool, so its memory is the step's peak activation memory; after a capture
the allocator's cached blocks are released, so peak reserved memory stays near the step's without graphs.

Shutdown: NCCL will not destroy a communicator while a CUDA graph that captured one of its collectives is
alive (its destroy waits for the graph's reference, pytorch#115388), and compiled steps live until the
interpreter's teardown, after a script's `destroy_process_group()`: that call would hang. So the first
graphed step wraps `torch.distributed.destroy_process_group` (and registers an exit handler) to release
every step's graphs first; `release_cuda_graphs()` does the same by hand (for a `destroy_process_group`
imported by name before that). Destroying any group releases every step's graphs (paracompile's own mesh
groups are subgroups); a step whose graphs were released captures anew on its next call. The steps are
tracked in one process-wide weak set, because NCCL's communicators are process-wide too. A step is meant to
be called from one thread at a time, as a model's forward is.
"""
from __future__ import annotations

import atexit
import collections
import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass
class _Graph:
    replay: Callable[[], None]
    buffers: dict  # input position -> the tensor the graph reads
    outputs: Sequence
    weight_addresses: list  # by input position: a weight's data pointer, None elsewhere


def capture_cuda_graph(function: Callable, inputs: list) -> tuple[Callable[[], None], Sequence]:
    """Records `function(*inputs)` into a CUDA graph (executing nothing); returns (replay, its outputs)."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    # thread_local: NCCL's watchdog thread queries events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = function(*inputs)
    # The eager first call left its activations in the allocator's cache; the graph has its own pool.
    torch.cuda.empty_cache()
    return graph.replay, outputs


class CudaGraphStep:
    """`compiled` (a callable of tensors and Python numbers), replayed as CUDA graphs; see the module
    docstring. `weights` are the positions of inputs the graph reads in place (parameters, buffers)."""

    live: "weakref.WeakSet[CudaGraphStep]" = weakref.WeakSet()  # the steps that hold graphs; see Shutdown

    def __init__(self, compiled: Callable, weights: set, name: str, max_graphs: int = 8,
                 capturer: Callable = capture_cuda_graph, device_type: str = "cuda"):
        self.compiled = compiled
        self.weights = set(weights)
        self.weight_positions = sorted(self.weights)
        self._data_positions_for: tuple = (None, [])  # (input count, the positions that are not weights)
        self.name = name
        self.max_graphs = max_graphs
        self.capturer = capturer
        self.device_type = device_type
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.seen: set = set()
        self.disabled: Optional[str] = None
        self.captures = 0
        self.replays = 0
        _release_before_destroy()

    def __call__(self, *args):
        if self.disabled is not None:
            return self.compiled(*args)
        key = self.signature(args)
        entry = self.graphs.get(key)
        if entry is not None and not self.same_weights(args, entry):
            del self.graphs[key]  # it reads the old weights: run as compiled once with the new, then capture
            self.seen.discard(key)
            entry = None
        if entry is None:
            if key not in self.seen:
                self.seen.add(key)
                return self.compiled(*args)
            reason = self.cannot_graph(args)
            if reason is not None:
                self.disable(reason)
                return self.compiled(*args)
            try:
                entry = self.capture(args)
            except Exception as error:  # an op that cannot be captured: run eagerly from now on
                self.disable(f"capturing it failed ({type(error).__name__}: {error})")
                return self.compiled(*args)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for position, buffer in entry.buffers.items():
                if args[position].data_ptr() != buffer.data_ptr():
                    buffer.copy_(args[position])
        entry.replay()
        self.replays += 1
        outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in entry.outputs]
        return type(entry.outputs)(outputs) if isinstance(entry.outputs, tuple) else outputs

    def signature(self, args) -> tuple:
        key = []
        for position in self._data_positions(len(args)):
            value = args[position]
            if isinstance(value, torch.Tensor):
                key.append((tuple(value.shape), value.stride(), value.dtype, value.device))
            else:
                key.append(value)
        return tuple(key)

    def _data_positions(self, count: int) -> list:
        if self._data_positions_for[0] != count:
            self._data_positions_for = (count, [p for p in range(count) if p not in self.weights])
        return self._data_positions_for[1]

    def weight_addresses(self, args) -> list:
        """Indexed by input position, as torch's check below reads it (cudagraph_trees' static_input_data_ptrs):
        a list in weight order would compare each weight with another's address and fail on every call."""
        addresses = [None] * len(args)
        for position in self.weight_positions:
            addresses[position] = args[position].data_ptr()
        return addresses

    def same_weights(self, args, entry: _Graph) -> bool:
        if len(args) != len(entry.weight_addresses):
            return False
        check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # CUDA builds
        if check is not None:
            return check(list(args), entry.weight_addresses, self.weight_positions)
        return all(args[p].data_ptr() == entry.weight_addresses[p] for p in self.weight_positions)

    def cannot_graph(self, args) -> Optional[str]:
        for position, value in enumerate(args):
            if isinstance(value, torch.Tensor) and value.device.type != self.device_type:
                return (f"input {position} is a {value.device.type} tensor of shape {tuple(value.shape)} (a Python "
                        "float Dynamo lifted into a tensor?): a graph would freeze its value. Pass it as a tensor on "
                        "the GPU")
        return None

    def capture(self, args) -> _Graph:
        buffers = {position: value.clone() for position, value in enumerate(args)
                   if isinstance(value, torch.Tensor) and position not in self.weights}
        inputs = [buffers.get(position, value) for position, value in enumerate(args)]
        replay, outputs = self.capturer(self.compiled, inputs)
        self.captures += 1
        CudaGraphStep.live.add(self)
        return _Graph(replay, buffers, outputs, self.weight_addresses(args))

    def release(self) -> None:
        """Drops every graph (and with it NCCL's hold on its communicators); the next call captures anew."""
        self.graphs.clear()

    def disable(self, reason: str) -> None:
        self.disabled = reason
        self.graphs.clear()
        warnings.warn(f"paracompile: CUDA graphs are off for {self.name}: {reason}; it runs without them",
                      stacklevel=3)


def release_cuda_graphs(synchronize: bool = True) -> int:
    """Releases the CUDA graphs of every paracompile step in this process; returns how many steps held
    some. Runs by itself before `torch.distributed.destroy_process_group` and at exit (see Shutdown)."""
    steps = [step for step in list(CudaGraphStep.live) if step.graphs]
    if synchronize and steps and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a replay still running reads the graphs' memory
    for step in steps:
        step.release()
    return len(steps)


def _release_before_destroy() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        return
    from torch.distributed import distributed_c10d

    original = distributed_c10d.destroy_process_group
    if getattr(original, "_paracompile_releases_graphs", False):
        return

    @functools.wraps(original)
    def destroy_process_group(*args, **kwargs):
        release_cuda_graphs()
        return original(*args, **kwargs)

    destroy_process_group._paracompile_releases_graphs = True
    distributed_c10d.destroy_process_group = destroy_process_group
    if getattr(dist, "destroy_process_group", None) is original:
        dist.destroy_process_group = destroy_process_group
    # At exit, no synchronize: after a peer died mid-collective it would wait out NCCL's timeout, and CUDA
    # frees a graph that is still running once it finishes.
    atexit.register(release_cuda_graphs, synchronize=False)
