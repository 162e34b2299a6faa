"""First Block Cache at run time: the decision, the cache slots, generations, and statistics.

One `FirstBlockCache` wraps the three compiled parts of one graph (passes/first_block_cache.py). Per call:

1. head: everything up to block 0, and r = (hidden stream after block 0) - (its input).
2. Which slot: the model's timestep marks generations. A timestep above the previous call's starts a new
   generation (all slots cleared, this call misses). The same timestep as the previous call means another
   call of the same step (cond and uncond called separately): the next slot. A lower timestep: the next
   step, slot 0.
3. The decision: diff = sum|r - r_prev| / sum|r_prev| over the global tensor. A hit when diff < threshold;
   forced misses: a new generation, an empty slot, a slot filled at other input shapes, the first
   `fbcache_warmup` calls of the slot, or `fbcache_max_hits` hits in a row.
4. A hit adds each stream's cached residual to its value after block 0 (with `fbcache_taylorseer_order` > 0,
   the residual extrapolated from the slot's last misses: TaylorSeer); a miss runs the rest of the region
   and stores, per stream, residual = (region output) - (value after block 0), and r_prev = r.
5. tail: everything after the region.

Every rank takes the same branch. On every call (hit or forced miss alike, so the ranks always make the
same collective calls) each rank contributes one row of numbers, and one all-gather gives every rank the
same table: its sums per candidate slot, whether it may hit there, its timestep, a hash of its plan, and
whether `reset_cache()` was called on it since its last call. Every rank then decides from that one table:
a reset on any rank resets the cache on every rank, before this call's decision; differing timesteps
raise on every rank; differing plans turn the cache off on every rank; a hit needs every rank's slot to be
ready and the summed diff under the threshold.

Host syncs: one per call. With the timestep on the device, the sums for both slots the call can land in
are computed before the timestep is read, and the table (timestep included) comes back in one transfer.

State belongs to the model, not to a compiled graph: Dynamo serves two instances of one class with one graph
(their weights are inputs), and may recompile a graph on one rank only (a guard on a rank's local size) or
on all ranks (a new resolution). So the state is looked up per call by the model's first weight (the tensor
object) and (the block loop, the cache options): a recompiled graph continues its model's generations,
slots and statistics, and every rank keeps making the same collective calls.
"""
from __future__ import annotations

import itertools
import math
import warnings
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from paracompile.runtime import IdentityWeakMap, RanksDisagreeError, collective_device

# Per model, by its first weight (the tensor object, held weakly: a new model never inherits a freed one's
# state through a reused address), then by state key: CacheState.
_states = IdentityWeakMap()
_states_without_weight: dict = {}
_generations: deque = deque(maxlen=4096)  # one dict per generation, oldest first
_model_numbers = itertools.count()
# reset_cache() calls so far; a model's state catches up (on every rank together) at its next call.
_resets = [0]


def reset_cache() -> None:
    """Forgets every cached residual and the statistics: the next call of every compiled model misses and
    starts a new generation. Under a mesh, calling it on one rank is enough: the next call resets the cache
    on every rank together (the decision's all-gather carries it), so calling it on a subset of ranks, or
    on all of them, is the same."""
    _resets[0] += 1
    _generations.clear()


def cache_stats() -> list[dict]:
    """Hits and misses per generation, oldest first: `{"model": n, "generation": k, "hits": h,
    "misses": m}`, where `model` numbers the cached models in the order they were first called and
    `generation` counts that model's generations from 0."""
    return [dict(generation) for generation in _generations]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def plan_hash(signature: str) -> float:
    """A hash of the plan, exact in float64."""
    return float(zlib.crc32(signature.encode()))


@dataclass
class _Slot:
    shape_key: tuple
    r_prev: Optional[torch.Tensor] = None
    # Per stream, the residual at the last miss and (TaylorSeer) its finite-difference derivatives over the
    # slot's calls: [R, dR, d2R, ...].
    derivatives: Optional[list] = None
    calls: int = 0  # calls that landed in the slot this generation, hits included
    computed_at: int = 0  # the value of `calls` at the last miss
    hits_in_row: int = 0


def taylor_update(previous: Optional[list], residual: torch.Tensor, steps: int, order: int) -> list:
    """TaylorSeer's table after a computed step: [R, dR, ..., up to `order`], each derivative the change of the
    one below it since the previous computed step (`previous`, `steps` calls ago) per call. The first computed
    step has no derivatives; each later one adds one, up to `order`."""
    derivatives = [residual]
    if previous is not None:
        for index in range(min(order, len(previous))):
            derivatives.append((derivatives[index] - previous[index]) / steps)
    return derivatives


def taylor_predict(derivatives: list, steps: int) -> torch.Tensor:
    """The residual `steps` calls after the computed step: sum of d^iR * steps^i / i! (order 0: R itself)."""
    predicted = derivatives[0]
    for index in range(1, len(derivatives)):
        predicted = predicted + derivatives[index] * (steps ** index / math.factorial(index))
    return predicted


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
        # A state made on one rank only (after a rank-local torch._dynamo.reset(), say) would not match the
        # other ranks' states: its first call asks every rank to reset, which brings them in step.
        self.resets_seen = -1

    def reset(self) -> None:
        self.slots.clear()
        self.last_timestep = None
        self.position = 0
        self.generation = None
        self.resets_seen = _resets[0]


# The columns of one rank's row in the decision's table: flags, then for each of the (at most 2) candidate
# slots whether it may hit, then for each its sum|r - r_prev| and sum|r_prev|.
_RESET, _PLAN, _HAS_TIMESTEP, _TIMESTEP = 0, 1, 2, 3
_ELIGIBLE, _SUMS = 4, 6
_ROW = _SUMS + 2 * 2


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
        self.taylor_order = options.fbcache_taylorseer_order
        self.timestep_index = timestep_index
        self.data_inputs = data_inputs
        self.weight_input = weight_input
        self.state_key = state_key
        self.plan = plan_hash(signature)
        self.description = description
        self.world_size = _world_size()
        # CUDA graphs reuse their output buffers on the next replay: what the cache keeps must be copied.
        self.keep_copies = _uses_cuda_graphs(options)

    def _state(self, args) -> CacheState:
        weight = args[self.weight_input] if self.weight_input is not None else None
        states = _states.setdefault(weight, {}) if isinstance(weight, torch.Tensor) else _states_without_weight
        state = states.get(self.state_key)
        if state is None:
            state = states[self.state_key] = CacheState()
        return state

    def __call__(self, *args):
        head_outputs = self.head(*args)
        residual = head_outputs[0]
        starts = [head_outputs[1 + i] for i in range(self.stream_count)]
        # The shapes of the call's tensors: graph-independent (a recompiled graph may take extra size inputs,
        # or a float as a 0-d tensor where the last graph had it as a constant), so a slot filled by one
        # graph of the model serves the next at the same shapes.
        shape_key = tuple((tuple(args[i].shape), args[i].dtype) for i in self.data_inputs
                          if isinstance(args[i], torch.Tensor) and args[i].dim() > 0)
        state = self._state(args)
        position, hit = self._decide(state, args, residual, shape_key)
        slot = state.slots.get(position)
        if hit:
            steps = slot.calls - slot.computed_at
            ends = [start + taylor_predict(derivatives, steps) for start, derivatives in zip(starts, slot.derivatives)]
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
            previous = slot.derivatives or [None] * len(residuals)
            steps = slot.calls - slot.computed_at
            slot.derivatives = [taylor_update(before, now, steps, self.taylor_order)
                                for before, now in zip(previous, residuals)]
            slot.r_prev, slot.computed_at, slot.hits_in_row = residual, slot.calls, 0
            state.generation["misses"] += 1
        slot.calls += 1
        return self.tail(*args, *[head_outputs[i] for i in self.head_to_tail], *ends)

    # ------------------------------------------------------------------------------------------------
    def _decide(self, state: CacheState, args, residual: torch.Tensor, shape_key: tuple) -> tuple[int, bool]:
        """(slot position, hit) for this call, the same on every rank; advances the generation and slot
        bookkeeping."""
        timestep = args[self.timestep_index] if self.timestep_index is not None else None
        on_host = not isinstance(timestep, torch.Tensor) or reads_without_sync(timestep)
        host_value = None
        if timestep is not None and on_host:  # a Python int (Dynamo passes ints as ints) or a CPU tensor
            host_value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if on_host:
            # Reading a CPU tensor does not wait for the device: the slot is known before the sums (none when
            # the call starts a generation, which misses).
            position = self._position_after(state, host_value)
            candidates = [] if position is None else [position]
        else:
            # The timestep lives on the device: the call lands in the next slot (same timestep as the last
            # call) or in slot 0 (a lower one; a higher one starts a generation and misses).
            candidates = list(dict.fromkeys((state.position + 1, 0)))
        table = self._table(state, timestep, host_value, residual, shape_key, candidates)

        if any(row[_RESET] for row in table):
            state.reset()  # on every rank, since every rank sees the same table
        if self.world_size > 1 and len({row[_PLAN] for row in table}) > 1 and not state.disabled:
            state.disabled = True
            warnings.warn("paracompile: the ranks planned different First Block Caches for this model; the cache "
                          "is off for it from now on (every call runs all blocks)", stacklevel=3)
        timesteps = [row[_TIMESTEP] if row[_HAS_TIMESTEP] else None for row in table]
        if len(set(timesteps)) > 1:
            raise RanksDisagreeError(
                f"paracompile: the ranks called the model with different timesteps "
                f"({', '.join(f'rank {r}: {t}' for r, t in enumerate(timesteps))}); every rank must make the same "
                "calls with the same inputs")
        position, new_generation = self._advance(state, timesteps[0])
        if new_generation or position not in candidates or any(row[_RESET] for row in table) or state.disabled:
            return position, False
        candidate = candidates.index(position)
        if not all(row[_ELIGIBLE + candidate] for row in table):
            return position, False  # some rank's slot is not ready (warm-up, shapes, hits in a row)
        different = sum(row[_SUMS + 2 * candidate] for row in table)
        total = sum(row[_SUMS + 2 * candidate + 1] for row in table)
        return position, total > 0 and different / total < self.threshold

    def _table(self, state, timestep, host_value, residual, shape_key, candidates) -> list[list[float]]:
        """Every rank's row (see the columns above), the same on every rank; one host sync."""
        device = residual.device
        row = [float(state.resets_seen != _resets[0]), self.plan, float(timestep is not None),
               0.0 if host_value is None else host_value]
        sums = []
        for position in candidates + [None] * (2 - len(candidates)):
            eligible = position is not None and self._eligible(state, position, shape_key)
            row.append(float(eligible))
            if eligible:
                previous = state.slots[position].r_prev
                sums += [(residual - previous).abs().sum(dtype=torch.float32),
                         previous.abs().sum(dtype=torch.float32)]
            else:
                sums += [residual.new_zeros((), dtype=torch.float32)] * 2
        local = torch.cat([torch.tensor(row, dtype=torch.float64, device=device), torch.stack(sums).to(torch.float64)])
        if timestep is not None and host_value is None:
            local[_TIMESTEP] = timestep.reshape(-1)[0].to(torch.float64)
        if self.world_size == 1:
            return [local.tolist()]
        device = collective_device()
        gathered = torch.empty(self.world_size * _ROW, dtype=torch.float64, device=device)
        dist.all_gather_into_tensor(gathered, local.to(device))
        values = gathered.tolist()
        return [values[r * _ROW:(r + 1) * _ROW] for r in range(self.world_size)]

    def _position_after(self, state: CacheState, timestep: Optional[float]) -> Optional[int]:
        """The slot a call with this timestep lands in (what `_advance` will return), without moving; None
        when it starts a generation."""
        if state.generation is None or state.resets_seen != _resets[0]:
            return None
        if timestep is None:
            return state.position
        if state.last_timestep is not None:
            if timestep > state.last_timestep:
                return None
            if timestep == state.last_timestep:
                return state.position + 1
        return 0

    def _advance(self, state: CacheState, timestep: Optional[float]) -> tuple[int, bool]:
        """(the call's slot, whether it starts a generation)."""
        new_generation = state.generation is None
        if timestep is not None:
            # A call after calls without a timestep (a graph in which Dynamo specialised a Python float into a
            # constant) is the next step of the same generation.
            if state.last_timestep is not None and timestep > state.last_timestep:
                new_generation = True
                state.position = 0
            elif state.last_timestep is not None and timestep == state.last_timestep:
                state.position += 1
            else:
                state.position = 0
            state.last_timestep = timestep
        if new_generation:
            state.position = 0
            state.slots.clear()
            state.generation = dict(model=state.number, generation=state.generation_count, hits=0, misses=0)
            state.generation_count += 1
            _generations.append(state.generation)
        return state.position, new_generation

    def _eligible(self, state: CacheState, position: int, shape_key: tuple) -> bool:
        """Whether a call landing in this slot may hit (otherwise it is a forced miss and needs no sums)."""
        if state.generation is None or state.disabled:
            return False
        slot = state.slots.get(position)
        return (slot is not None and slot.shape_key == shape_key and slot.r_prev is not None
                and slot.calls >= self.warmup and (self.max_hits is None or slot.hits_in_row < self.max_hits))


def reads_without_sync(tensor: torch.Tensor) -> bool:
    """Whether reading a value of `tensor` on the host leaves the device's queue alone (a CPU tensor)."""
    return tensor.device.type == "cpu"


def _uses_cuda_graphs(options) -> bool:
    """Inductor's own CUDA graphs reuse their output buffers on the next replay, so what the cache keeps must
    be copied (paracompile's CUDA graphs return copies already)."""
    from paracompile.options import inductor_patches

    return options.compiler == "inductor" and bool(inductor_patches(options).get("triton.cudagraphs"))
