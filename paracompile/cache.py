"""First Block Cache at run time: the decision, the cache slots, generations, and statistics.

One `FirstBlockCache` wraps the three compiled parts of one graph (passes/first_block_cache.py). Per call:

1. head: everything up to block 0, and r = (hidden stream after block 0) - (its input).
2. Which slot: the model's timestep marks generations. A timestep above the previous call's starts a new
   generation (all slots cleared, this call misses). The same timestep as the previous call means another
   call of the same step (cond and uncond called separately): the next slot. A lower timestep: the next
   step, slot 0.
3. The decision: diff = sum|r - r_prev| / sum|r_prev| over the global tensor (the two sums are all-reduced
   over the world, so every rank gets the same numbers and takes the same branch). A hit when
   diff < threshold; forced misses: a new generation, an empty slot, a slot filled at other input shapes,
   the first `fbcache_warmup` calls of the slot, or `fbcache_max_hits` hits in a row.
4. A hit adds each stream's cached residual to its value after block 0; a miss runs the rest of the region
   and stores, per stream, residual = (region output) - (value after block 0), and r_prev = r.
5. tail: everything after the region.

Host syncs: one per call at most. With the timestep on the device, the sums for both slots the call can
land in are computed before the timestep is read, and the timestep and sums come back in one transfer.

State belongs to the model, not to a compiled graph: Dynamo serves two instances of one class with one graph
(their weights are inputs), and may recompile a graph on one rank only (a guard on a rank's local size). So
the state is looked up per call by (the graph's code frame, the plan, the options, the address of the
model's first weight): a recompiled graph continues its model's generations and slots, and every rank keeps
making the same collective calls.
"""
from __future__ import annotations

import itertools
import warnings
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

_states: dict = {}  # state key -> CacheState
_generations: deque = deque(maxlen=4096)  # one dict per generation, oldest first
_model_numbers = itertools.count()


def reset_cache() -> None:
    """Forgets every cached residual and the statistics: the next call of every compiled model misses and
    starts a new generation."""
    _states.clear()
    _generations.clear()


def cache_stats() -> list[dict]:
    """Hits and misses per generation, oldest first: `{"model": n, "generation": k, "hits": h,
    "misses": m}`, where `model` numbers the cached models in the order they were first called and
    `generation` counts that model's generations from 0."""
    return [dict(generation) for generation in _generations]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plan_check(signature: str) -> tuple[float, float]:
    """(h, h * h) for a small hash h of the plan: summed over n ranks they equal (n h, n h * h) on every rank
    only if all ranks have the same h (equality in Cauchy-Schwarz), and stay exact in float32."""
    value = float(zlib.crc32(signature.encode()) % 251 + 1)
    return value, value * value


@dataclass
class _Slot:
    shape_key: tuple
    r_prev: Optional[torch.Tensor] = None
    residuals: Optional[list] = None
    calls: int = 0
    hits_in_row: int = 0


class CacheState:
    """One model's generations and slots."""

    def __init__(self):
        self.number = next(_model_numbers)
        self.slots: dict[int, _Slot] = {}
        self.last_timestep: Optional[float] = None
        self.position = 0
        self.generation: Optional[dict] = None
        self.generation_count = 0
        self.disabled = False  # the ranks planned different caches: every call runs the whole region


class FirstBlockCache:
    """The compiled callable: runs head, then rest or the cached residuals, then tail."""

    def __init__(self, head: Callable, rest: Callable, tail: Callable, split, options, timestep_index: Optional[int],
                 data_inputs: list[int], weight_input: Optional[int], state_key: tuple, signature: str,
                 description: str = ""):
        self.head, self.rest, self.tail = head, rest, tail
        self.stream_count = split.stream_count
        self.head_to_rest = split.head_to_rest
        self.head_to_tail = split.head_to_tail
        self.threshold = float(options.threshold)
        self.warmup = options.fbcache_warmup
        self.max_hits = options.fbcache_max_hits
        self.timestep_index = timestep_index
        self.data_inputs = data_inputs
        self.weight_input = weight_input
        self.state_key = state_key
        self.check = plan_check(signature)
        self.description = description
        self.world_size = _world_size()
        # CUDA graphs reuse their output buffers on the next replay: what the cache keeps must be copied.
        self.keep_copies = _uses_cuda_graphs(options)

    def _state(self, args) -> CacheState:
        weight = args[self.weight_input] if self.weight_input is not None else None
        key = self.state_key + ((weight.device, weight.data_ptr()) if isinstance(weight, torch.Tensor) else (None,),)
        state = _states.get(key)
        if state is None:
            state = _states[key] = CacheState()
        return state

    def __call__(self, *args):
        head_outputs = self.head(*args)
        residual = head_outputs[0]
        starts = [head_outputs[1 + i] for i in range(self.stream_count)]
        shape_key = tuple((tuple(args[i].shape), args[i].dtype) if isinstance(args[i], torch.Tensor) else args[i]
                          for i in self.data_inputs)
        state = self._state(args)
        position, hit = self._decide(state, args, residual, shape_key)
        slot = state.slots.get(position)
        if hit:
            ends = [start + cached for start, cached in zip(starts, slot.residuals)]
            slot.hits_in_row += 1
            state.generation["hits"] += 1
        else:
            rest_outputs = self.rest(*args, *[head_outputs[i] for i in self.head_to_rest])
            ends = list(rest_outputs[:self.stream_count])
            residuals = list(rest_outputs[self.stream_count:])
            if self.keep_copies:
                residual, residuals = residual.clone(), [r.clone() for r in residuals]
            if slot is None or slot.shape_key != shape_key:
                slot = state.slots[position] = _Slot(shape_key)
            slot.r_prev, slot.residuals, slot.hits_in_row = residual, residuals, 0
            state.generation["misses"] += 1
        slot.calls += 1
        return self.tail(*args, *[head_outputs[i] for i in self.head_to_tail], *ends)

    # ------------------------------------------------------------------------------------------------
    def _decide(self, state: CacheState, args, residual: torch.Tensor, shape_key: tuple) -> tuple[int, bool]:
        """(slot position, hit) for this call; advances the generation and slot bookkeeping."""
        timestep = args[self.timestep_index] if self.timestep_index is not None else None
        if timestep is None or reads_without_sync(timestep):
            # Reading a CPU tensor does not wait for the device: pick the slot first, then at most one
            # transfer for the decision.
            value = float(timestep.reshape(-1)[0]) if timestep is not None else None
            position = self._advance(state, value)
            candidates = [position] if self._eligible(state, position, shape_key) else []
            if not candidates:
                return position, False
            values = self._reduced_sums(state, residual, candidates).tolist()
        else:
            # The timestep lives on the device: the call lands in the next slot (same timestep as the last
            # call) or in slot 0 (a lower one; a higher one starts a generation and misses). Compute the sums
            # for both before reading the timestep, and read everything in one transfer.
            candidates = [p for p in dict.fromkeys((state.position + 1, 0)) if self._eligible(state, p, shape_key)]
            first = timestep.reshape(-1)[:1].to(torch.float64)
            if candidates:
                sums = self._reduced_sums(state, residual, candidates)
                first = torch.cat([first, sums.to(device=first.device, dtype=torch.float64)])
            everything = first.tolist()
            position = self._advance(state, everything[0])
            values = everything[1:]
            if position not in candidates:
                return position, False
        if not self._plans_agree(state, values[-2:]):
            return position, False
        offset = 2 * candidates.index(position)
        return position, self._is_hit(values[offset], values[offset + 1])

    def _advance(self, state: CacheState, timestep: Optional[float]) -> int:
        new_generation = state.generation is None
        if timestep is not None:
            if state.last_timestep is None or timestep > state.last_timestep:
                new_generation = True
                state.position = 0
            elif timestep == state.last_timestep:
                state.position += 1
            else:
                state.position = 0
            state.last_timestep = timestep
        if new_generation:
            state.slots.clear()
            state.generation = dict(model=state.number, generation=state.generation_count, hits=0, misses=0)
            state.generation_count += 1
            _generations.append(state.generation)
        return state.position

    def _eligible(self, state: CacheState, position: int, shape_key: tuple) -> bool:
        """Whether a call landing in this slot may hit (otherwise it is a forced miss and needs no sums)."""
        if state.generation is None or state.disabled:
            return False
        slot = state.slots.get(position)
        return (slot is not None and slot.shape_key == shape_key and slot.r_prev is not None
                and slot.calls >= self.warmup and (self.max_hits is None or slot.hits_in_row < self.max_hits))

    def _reduced_sums(self, state: CacheState, residual: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """[sum|r - r_prev|, sum|r_prev|] per candidate slot, then the plan check, summed over all ranks: each
        rank holds its shard of the hidden stream (or a copy of it), and a ratio of sums does not change when
        every piece is counted the same number of times."""
        parts = []
        for position in positions:
            previous = state.slots[position].r_prev
            parts.append((residual - previous).abs().sum(dtype=torch.float32))
            parts.append(previous.abs().sum(dtype=torch.float32))
        sums = torch.stack(parts)
        if self.world_size > 1:
            sums = torch.cat([sums, sums.new_tensor(self.check)])
            dist.all_reduce(sums)
        return sums

    def _plans_agree(self, state: CacheState, check: list[float]) -> bool:
        if self.world_size == 1:
            return True
        value, square = self.check
        if check == [self.world_size * value, self.world_size * square]:
            return True
        state.disabled = True  # every rank sees the same sums, so every rank turns the cache off here
        warnings.warn("paracompile: the ranks planned different First Block Caches for this model; the cache "
                      "is off for it from now on (every call runs all blocks)", stacklevel=3)
        return False

    def _is_hit(self, different: float, total: float) -> bool:
        return total > 0 and different / total < self.threshold


def reads_without_sync(tensor: torch.Tensor) -> bool:
    """Whether reading a value of `tensor` on the host leaves the device's queue alone (a CPU tensor)."""
    return tensor.device.type == "cpu"


def _uses_cuda_graphs(options) -> bool:
    if options.compiler != "inductor":
        return False
    patches: dict[str, Any] = {}
    if options.mode is not None:
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(options.mode))
    patches.update(options.inductor)
    return bool(patches.get("triton.cudagraphs"))
