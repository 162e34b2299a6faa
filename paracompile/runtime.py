"""What runs around a compiled multi-rank graph on every call: the input check and the forward-only guard.

Invariant: whether a call makes the input check's collectives depends only on how often this model has
been called with this set of inputs, which is the same on every rank (every rank makes the same calls);
never on this rank's compiles, recompiles or caches. So every rank makes the same collective calls.

- **The input check** (`check_inputs`): the contract is that every rank passes the same inputs. A rank
  given other inputs would run the same collectives on other data and every rank would return a blend,
  or abort inside the transport when sizes differ. On a checked call each rank fingerprints its inputs
  (name, shape and dtype of every tensor input, a sum and a sum of absolute values of each) and the
  ranks compare them: one all-reduce of a hash of the names, shapes and dtypes, then one of the sums
  (their maximum and minimum over the ranks). Only when something differs do the ranks exchange their
  fingerprints in full, and then every rank raises the same error, naming the first input that differs.
- **Forward only**: gradients through the rewritten graph are not exact yet (every rank would get its own
  token shard's share of the parameter gradients, twice over). With grad mode on, the compiled graph runs
  without recording autograd history, and its outputs carry a backward that raises on every rank.
"""
from __future__ import annotations

import hashlib
import re
import weakref
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


# Relative tolerance of the sums: identical inputs give identical sums; a sum that differs by more than
# this fraction of the input's absolute sum comes from other data.
SUM_TOLERANCE = 1e-6


class RanksDisagreeError(RuntimeError):
    """The ranks called the compiled model with different inputs."""


def readable_input_name(placeholder_name: str) -> str:
    """Dynamo's placeholder names (`L_latents_`, `L_kwargs_timestep_`,
    `L_self_modules_blocks_modules_0_modules_qkv_parameters_weight_`) in the user's words
    (`latents`, `timestep`, `self.blocks.0.qkv.weight`)."""
    name = re.sub(r"^L_", "", str(placeholder_name)).rstrip("_")
    name = re.sub(r"^kwargs_", "", name)
    name = re.sub(r"_(modules|parameters|buffers)_", ".", name)
    return name.replace("self_", "self.", 1) if name.startswith("self_") else name


def model_state_positions(names: Sequence[str], example_inputs: Sequence = ()) -> list[int]:
    """The positions of the inputs that are the model's own state (parameters, buffers), by Dynamo's
    placeholder names (`L_self_...`, `..._parameters_...`, `..._buffers_...`) or by being a Parameter."""
    values = list(example_inputs) + [None] * (len(names) - len(example_inputs))
    return [i for i, (name, value) in enumerate(zip(map(str, names), values))
            if isinstance(value, torch.nn.Parameter) or name.startswith("L_self_")
            or "_parameters_" in name or "_buffers_" in name]


class InputCheck:
    """Compares the inputs of a compiled graph's calls across the ranks (see the module docstring).

    `names` are the graph's placeholder names, `static` the indices of the model's own state
    (parameters and buffers: checked on the first call only, since summing every weight on every call
    would cost a full read of the model)."""

    def __init__(self, names: Sequence[str], example_inputs: Sequence, mode: str):
        self.mode = mode
        self.tensors = [i for i, value in enumerate(example_inputs) if isinstance(value, torch.Tensor)]
        self.names = [readable_input_name(name) for name in names]
        self.static = set(model_state_positions(names, example_inputs)) & set(self.tensors)
        self.data = [i for i in self.tensors if i not in self.static]
        self.key_names = tuple(sorted(str(names[i]) for i in self.tensors))

    def maybe_check(self, args: Sequence) -> None:
        if self.mode == "off":
            return
        weight = next((args[i] for i in self.tensors if i in self.static), None)
        count = _CALLS.next(weight, self.key_names)
        if count == 0:
            verify_same_on_every_rank([(self.names[i], args[i]) for i in self.tensors])
        elif self.mode == "always":
            verify_same_on_every_rank([(self.names[i], args[i]) for i in self.data])


class IdentityWeakMap:
    """A map keyed by objects' identity, holding them weakly (tensors compare by value, so a
    WeakKeyDictionary cannot hold them); an entry goes with its object."""

    def __init__(self):
        self._entries: dict = {}  # id -> (weak reference, value)

    def setdefault(self, key, default):
        entry = self._entries.get(id(key))
        if entry is not None and entry[0]() is key:
            return entry[1]
        entries = self._entries

        def forget(reference, identity=id(key)):
            if entries.get(identity, (None,))[0] is reference:
                del entries[identity]

        self._entries[id(key)] = (weakref.ref(key, forget), default)
        return default

    def __len__(self) -> int:
        return len(self._entries)


class CallCounts:
    """How often each model was called with each set of inputs, the same count on every rank (every rank
    makes the same calls), whatever this rank compiled or recompiled. A model is known by its first weight,
    the tensor object itself, held weakly: a new model counts from 0 even when its weights reuse the memory
    of a freed one (an address could be reused on one rank and not on another)."""

    def __init__(self):
        self.by_weight = IdentityWeakMap()
        self.without_weight: dict = {}

    def next(self, weight: Optional[torch.Tensor], inputs: tuple) -> int:
        """The number of earlier calls, and counts this one."""
        counts = self.by_weight.setdefault(weight, {}) if isinstance(weight, torch.Tensor) else self.without_weight
        count = counts.get(inputs, 0)
        counts[inputs] = count + 1
        return count


_CALLS = CallCounts()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _structure(entries) -> list[tuple]:
    return [(name, tuple(int(s) for s in tensor.shape), str(tensor.dtype)) for name, tensor in entries]


def _structure_hash(structure) -> int:
    digest = hashlib.blake2b(repr(structure).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # fits an int64, and so does its negation


def arithmetic_view(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in a dtype that sums and takes absolute values on every device, with every value kept:
    integers and booleans as float64, float8 (a torchao float8 weight's data; CUDA has no `abs` or `sum`
    for it) as bfloat16, which holds every float8 value exactly."""
    if not tensor.is_floating_point():
        return tensor.to(torch.float64)
    if tensor.dtype.itemsize == 1:
        return tensor.to(torch.bfloat16)
    return tensor


def _sums(entries, device: torch.device) -> torch.Tensor:
    """[sum, sum of absolute values] of every tensor, in float64, in one tensor on `device`."""
    parts = []
    for _, tensor in entries:
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        tensor = arithmetic_view(tensor)
        parts.append(tensor.sum(dtype=torch.float64).reshape(1))
        parts.append(tensor.abs().sum(dtype=torch.float64).reshape(1))
    if not parts:
        return torch.zeros(0, dtype=torch.float64, device=device)
    # NaN and infinities as finite stand-ins: the same non-finite input on every rank compares equal.
    return torch.nan_to_num(torch.cat([p.to(device) for p in parts]), nan=1e300, posinf=1e299, neginf=-1e299)


def verify_same_on_every_rank(entries: list) -> None:
    """Raises RanksDisagreeError on every rank when the ranks' `entries` ((name, tensor) pairs) differ."""
    device = collective_device()
    structure = _structure(entries)
    digest = _structure_hash(structure)
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, negated_lowest = extremes.tolist()
    same = highest == -negated_lowest
    sums = _sums(entries, device)
    if same and sums.numel():
        both = torch.cat([sums, -sums])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        highest, lowest = both[:sums.numel()], -both[sums.numel():]
        absolute = highest[1::2].repeat_interleave(2)
        same = bool(((highest - lowest) <= SUM_TOLERANCE * absolute).all())
    if same:
        return
    mine = [(name, shape, dtype, total, absolute)
            for (name, shape, dtype), total, absolute in zip(structure, sums[0::2].tolist(), sums[1::2].tolist())]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    raise RanksDisagreeError(describe_disagreement(everyone))


def describe_disagreement(fingerprints: list[list[tuple]]) -> str:
    """The first input whose fingerprint differs between the ranks, in words (the same text on every rank)."""
    advice = ("every rank must call the compiled model with the same inputs (same shapes, same values: "
              "draw noise with the same seed on every rank); paracompile splits the work itself. The "
              "option check_inputs ('first', 'always' or 'off') controls this check")
    reference = fingerprints[0]
    for rank, other in enumerate(fingerprints[1:], start=1):
        names = [entry[0] for entry in reference]
        other_names = [entry[0] for entry in other]
        if names != other_names:
            missing = [n for n in names if n not in other_names] + [n for n in other_names if n not in names]
            return (f"paracompile: the ranks were called with different inputs: rank 0 has inputs {names} and "
                    f"rank {rank} has {other_names} (differing: {missing}); {advice}")
        for (name, shape, dtype, total, absolute), (_, shape_o, dtype_o, total_o, absolute_o) in zip(reference, other):
            if shape != shape_o:
                return (f"paracompile: the ranks were called with different inputs: input '{name}' has shape "
                        f"{shape} on rank 0 and {shape_o} on rank {rank}; {advice}")
            if dtype != dtype_o:
                return (f"paracompile: the ranks were called with different inputs: input '{name}' has dtype "
                        f"{dtype} on rank 0 and {dtype_o} on rank {rank}; {advice}")
            tolerance = SUM_TOLERANCE * max(absolute, absolute_o)
            if abs(total - total_o) > tolerance or abs(absolute - absolute_o) > tolerance:
                return (f"paracompile: the ranks were called with different inputs: input '{name}' "
                        f"{tuple(shape)} holds other values on rank {rank} than on rank 0 (sum {total_o:.6g} "
                        f"against {total:.6g}); {advice}")
    return f"paracompile: the ranks were called with different inputs; {advice}"


class ForwardOnly(torch.autograd.Function):
    """Connects a compiled graph's outputs to its inputs that require grad, with a backward that raises."""

    @staticmethod
    def forward(ctx, run: Callable, reason: str, *inputs):
        ctx.reason = reason
        outputs = run()
        ctx.mark_non_differentiable(*[o for o in outputs if not (o.is_floating_point() or o.is_complex())])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.reason)


def trainable(compiled: Callable, check: Optional[InputCheck] = None) -> Callable:
    """`compiled` (a graph compiled to train) with the input check before every call, and the partial
    gradients of its replicated inputs summed over the ranks in backward (differentiable.SumGradsOverRanks)."""
    from paracompile.differentiable import SumGradsOverRanks

    def run(*args):
        if check is not None:
            with torch.no_grad():
                check.maybe_check(args)
        if not torch.is_grad_enabled():
            return compiled(*args)
        positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if not positions:
            return compiled(*args)
        args = list(args)
        for position, tensor in zip(positions, SumGradsOverRanks.apply(*[args[i] for i in positions])):
            args[position] = tensor
        return compiled(*args)

    return run


def guarded(compiled: Callable, reason: str, check: Optional[InputCheck] = None) -> Callable:
    """`compiled` with the input check before every call, and with a backward that raises `reason`."""

    def run(*args):
        if check is not None:
            check.maybe_check(args)
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if not needs_grad:
            return compiled(*args)
        with torch.no_grad():
            outputs = compiled(*args)
        positions = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
        linked = ForwardOnly.apply(lambda: [outputs[i] for i in positions], reason,
                                   *[a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
        result = list(outputs)
        for position, tensor in zip(positions, linked):
            result[position] = tensor
        return type(outputs)(result) if isinstance(outputs, tuple) else result

    return run
