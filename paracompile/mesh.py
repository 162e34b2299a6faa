"""The device mesh: which ranks split batches, tokens and heads, and the process groups of each split.

The `mesh` option is "auto", a dict of dim names to degrees, or a `torch.distributed.DeviceMesh` whose
dim names are among `batch`, `ring` and `ulysses`.

Rank layout. With a dict, ranks are laid out like `init_device_mesh(device, (batch, ring, ulysses),
mesh_dim_names=("batch", "ring", "ulysses"))`: rank = (batch_index * ring + ring_index) * ulysses +
ulysses_index. So a Ulysses group is consecutive ranks (its all-to-alls are the heaviest traffic and get
the fastest links of one host), a ring group strides over Ulysses groups, and the batch dim is
outermost. With a DeviceMesh, its own rank tensor decides, whatever the order of its dims.

Groups. Every rank belongs to one group per dim (its ranks differ only in that dim's index), and to one
*sequence* group: the ranks of its batch index. Tokens are split over the sequence group; Ring attention
passes whole Ulysses-group blocks round the ring, and `ring_blocks` says which token shards each block
holds. As in every process group, a rank's index in a group is its place among the members' global
ranks (with the dict layout, sequence rank = ring_index * ulysses + ulysses_index).

"auto" is resolved once the graph is known (`resolve_auto`): the Ulysses degree is the largest divisor
of the world size that divides every self-attention head count, and Ring takes the rest.

Shutdown. `destroy_process_group()` frees a process group only when nothing else holds it. Compiling
must not change that: see `release_pinned_groups`.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.distributed as dist

from paracompile.collectives import ProcessGroupInfo
from paracompile.options import MESH_DIM_NAMES


@dataclass(frozen=True)
class MeshPlan:
    world_size: int
    degrees: dict  # name -> degree, for every name in MESH_DIM_NAMES
    explicit: bool  # the user named the Ulysses degree: a head count it does not divide is an error
    auto: bool = False  # "auto": degrees are provisional until resolve_auto has seen the graph
    rank_layout: Optional[tuple] = None  # nested tuples [batch][ring][ulysses] -> global rank
    batch: Optional[ProcessGroupInfo] = None
    ring: Optional[ProcessGroupInfo] = None
    ulysses: Optional[ProcessGroupInfo] = None
    sequence: Optional[ProcessGroupInfo] = None  # ring x ulysses: the group that splits tokens
    # For each ring position: the sequence ranks of that position's Ulysses group, in Ulysses order.
    ring_blocks: tuple = ()
    auto_reason: str = ""

    def describe(self) -> str:
        parts = ", ".join(f"{name} {self.degrees[name]}" for name in MESH_DIM_NAMES)
        chosen = f" (auto: {self.auto_reason})" if self.auto_reason else ""
        return f"world size {self.world_size}, mesh: {parts}{chosen}"

    def describe_groups(self) -> str:
        if self.rank_layout is None:
            return "one rank"
        layout = torch.tensor(self.rank_layout)
        ulysses_groups = layout.reshape(-1, self.degrees["ulysses"]).tolist()
        ring_groups = layout.transpose(1, 2).reshape(-1, self.degrees["ring"]).tolist()
        return f"ulysses groups {ulysses_groups}, ring groups {ring_groups}"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def release_pinned_groups() -> None:
    """torch.distributed.nn.functional declares its functions with `group=group.WORLD`, a default evaluated
    when the module is first imported. torch._dynamo imports it, and torch.compile imports torch._dynamo at
    its first call, usually after init_process_group: the defaults then hold the default process group for
    the rest of the process. destroy_process_group() cannot free it, so its gloo threads (the TCP loop, the
    worker run-loops, the store's loop) live on into interpreter teardown, the state in which gloo threads can
    abort a process (PyTorch PR 179291); issue 14's survey saw ranks abort there after correct results
    ("terminate called without an active exception", twice in 60 two-rank runs). A default of None is what
    an import before init_process_group gives, and means the default group to every c10d call those
    functions make; so any process group held there is replaced by None."""
    module = sys.modules.get("torch.distributed.nn.functional")
    if module is None:
        return
    for function in vars(module).values():
        defaults = getattr(function, "__defaults__", None)
        if defaults and any(isinstance(value, dist.ProcessGroup) for value in defaults):
            function.__defaults__ = tuple(None if isinstance(value, dist.ProcessGroup) else value
                                          for value in defaults)


def resolve_mesh(mesh: Any) -> MeshPlan:
    world_size = _world_size()
    if world_size > 1:
        release_pinned_groups()
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"paracompile: option 'mesh' must be 'auto', a dict of {list(MESH_DIM_NAMES)} "
                             f"to degrees, or a DeviceMesh; got {mesh!r}")
        degrees = {"batch": 1, "ring": 1, "ulysses": world_size}
        return _plan(world_size, degrees, explicit=False, layout=None, auto=world_size > 1)
    if isinstance(mesh, dict):
        unknown = sorted(set(mesh) - set(MESH_DIM_NAMES))
        if unknown:
            raise ValueError(f"paracompile: mesh dims {unknown} are unknown; valid dims are {list(MESH_DIM_NAMES)}")
        for name, degree in mesh.items():
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ValueError(f"paracompile: mesh degree for '{name}' must be a positive int, got {degree!r}")
        degrees = {name: mesh.get(name, 1) for name in MESH_DIM_NAMES}
        return _plan(world_size, degrees, explicit="ulysses" in mesh, layout=None)
    if _is_device_mesh(mesh):
        names = mesh.mesh_dim_names
        if not names or any(name not in MESH_DIM_NAMES for name in names):
            raise ValueError(f"paracompile: a DeviceMesh's dims must be named among {list(MESH_DIM_NAMES)}; "
                             f"got {names}")
        degrees = {name: (mesh.size(names.index(name)) if name in names else 1) for name in MESH_DIM_NAMES}
        # The mesh's rank tensor with its dims put in (batch, ring, ulysses) order.
        ranks = mesh.mesh
        for name in MESH_DIM_NAMES:
            if name not in names:
                ranks = ranks.unsqueeze(-1)
                names = tuple(names) + (name,)
        ranks = ranks.permute([names.index(name) for name in MESH_DIM_NAMES])
        return _plan(world_size, degrees, explicit="ulysses" in mesh.mesh_dim_names, layout=ranks)
    raise ValueError(f"paracompile: option 'mesh' must be 'auto', a dict or a DeviceMesh; got {type(mesh).__name__}")


def resolve_auto(plan: MeshPlan, head_counts: list[int]) -> MeshPlan:
    """`mesh="auto"` once the self-attention head counts are known: the largest Ulysses degree that
    divides the world size and every head count, Ring for the rest."""
    if not plan.auto:
        return plan
    world = plan.world_size
    counts = sorted(set(head_counts))
    ulysses = max(d for d in range(1, world + 1) if world % d == 0 and all(h % d == 0 for h in counts))
    degrees = {"batch": 1, "ring": world // ulysses, "ulysses": ulysses}
    reason = (f"Ulysses {ulysses} is the largest divisor of the world size {world} that divides every "
              f"self-attention head count {counts}" + (f"; Ring takes the remaining {world // ulysses}"
                                                        if ulysses < world else ""))
    return replace(_plan(world, degrees, explicit=False, layout=None), auto_reason=reason)


def _is_device_mesh(value: Any) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch built without distributed
        return False
    return isinstance(value, DeviceMesh)


def _plan(world_size: int, degrees: dict, explicit: bool, layout: Optional[torch.Tensor],
          auto: bool = False) -> MeshPlan:
    total = degrees["batch"] * degrees["ring"] * degrees["ulysses"]
    if total > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"paracompile: mesh {degrees} needs {total} ranks, but no process group is initialised; "
                         "launch with torchrun and call torch.distributed.init_process_group() first")
    if total != world_size:
        raise ValueError(f"paracompile: the mesh degrees {degrees} multiply to {total}, but the world size is "
                         f"{world_size}")
    if world_size == 1:
        return MeshPlan(1, degrees, explicit)
    if layout is None:
        layout = torch.arange(world_size).reshape(degrees["batch"], degrees["ring"], degrees["ulysses"])
    rank_layout = tuple(tuple(tuple(int(r) for r in row) for row in plane) for plane in layout.tolist())
    groups = _groups(rank_layout)
    return MeshPlan(world_size, degrees, explicit, auto=auto, rank_layout=rank_layout, **groups)


class _GroupRegistry:
    """The process groups paracompile made, per default process group. Groups are made once per rank layout:
    every rank must create every group, in the same order, and recompiles must not create new ones. A new
    world (destroy_process_group, then init_process_group again, maybe at another rank) has its own groups:
    the old names would point at destroyed groups, or at another rank's."""

    def __init__(self):
        self._owner = None  # a weak reference to the default group these groups belong to
        self.by_layout: dict[tuple, dict] = {}
        self.by_ranks: dict[tuple, str] = {}

    def current(self) -> "_GroupRegistry":
        default = dist.distributed_c10d._get_default_group()
        if self._owner is None or self._owner() is not default:
            self._owner = weakref.ref(default)
            self.by_layout, self.by_ranks = {}, {}
        return self


_REGISTRY = _GroupRegistry()


def _groups(rank_layout: tuple) -> dict:
    """This rank's group of every dim. A process group numbers its members in the order of their global
    ranks, whatever order they were listed in, so every index here is that order's; `ring_blocks` maps
    each ring position to the sequence ranks of its Ulysses group, in Ulysses order."""
    made = _REGISTRY.current().by_layout
    if rank_layout in made:
        return made[rank_layout]
    layout = torch.tensor(rank_layout)
    batch, ring, ulysses = layout.shape
    me = dist.get_rank()
    partitions = {
        "batch": layout.permute(1, 2, 0).reshape(-1, batch),
        "ring": layout.permute(0, 2, 1).reshape(-1, ring),
        "ulysses": layout.reshape(-1, ulysses),
        "sequence": layout.reshape(batch, ring * ulysses),
    }
    members = {name: sorted(next(group for group in ranks.tolist() if me in group))
               for name, ranks in partitions.items()}
    groups: dict = {}
    for name, ranks in partitions.items():
        size = ranks.shape[1]
        groups[name] = None if size == 1 else ProcessGroupInfo(
            size, members[name].index(me), _group_name(sorted(sorted(group) for group in ranks.tolist())))
    ulysses_group_of = {rank: sorted(group) for group in partitions["ulysses"].tolist() for rank in group}
    groups["ring_blocks"] = tuple(
        tuple(members["sequence"].index(member) for member in ulysses_group_of[peer])
        for peer in members["ring"])
    made[rank_layout] = groups
    return groups


def _group_name(ranks_per_group: list[list[int]]) -> str:
    """The name of this rank's group among `ranks_per_group` (a partition of the world), creating the
    groups on first use. The default group serves where one group holds the world in rank order."""
    key = tuple(tuple(group) for group in ranks_per_group)
    names = _REGISTRY.current().by_ranks
    if key not in names:
        if len(key) == 1 and list(key[0]) == list(range(dist.get_world_size())):
            name = dist.distributed_c10d._get_default_group().group_name
        else:
            mine, _ = dist.new_subgroups_by_enumeration([list(group) for group in key])
            name = mine.group_name
        names[key] = name
    return names[key]
