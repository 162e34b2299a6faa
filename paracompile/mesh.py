"""The device mesh: which ranks split tokens, heads and batches, and how the graph names their groups.

The `mesh` option is "auto", a dict of dim names to degrees, or a `torch.distributed.DeviceMesh` whose
dim names are among `batch`, `ring` and `ulysses`. With a dict, ranks are laid out like
`init_device_mesh(device, degrees, mesh_dim_names=names)` in the order batch, ring, ulysses: Ulysses
groups are consecutive ranks (the fastest links on one host), ring groups stride over them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from paracompile.collectives import ProcessGroupInfo
from paracompile.options import MESH_DIM_NAMES


@dataclass
class MeshPlan:
    world_size: int
    degrees: dict  # name -> degree, for every name in MESH_DIM_NAMES
    ulysses: Optional[ProcessGroupInfo]  # the sequence-parallel group, None when the world is one rank
    explicit: bool  # the user named the Ulysses degree: a head count it does not divide is an error

    def describe(self) -> str:
        parts = ", ".join(f"{name} {self.degrees[name]}" for name in MESH_DIM_NAMES)
        return f"world size {self.world_size}, mesh: {parts}{'' if self.explicit else ' (auto)'}"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_mesh(mesh: Any) -> MeshPlan:
    world_size = _world_size()
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"paracompile: option 'mesh' must be 'auto', a dict of {list(MESH_DIM_NAMES)} "
                             f"to degrees, or a DeviceMesh; got {mesh!r}")
        degrees = {"batch": 1, "ring": 1, "ulysses": world_size}
        return _plan(world_size, degrees, explicit=False, device_mesh=None)
    if isinstance(mesh, dict):
        unknown = sorted(set(mesh) - set(MESH_DIM_NAMES))
        if unknown:
            raise ValueError(f"paracompile: mesh dims {unknown} are unknown; valid dims are {list(MESH_DIM_NAMES)}")
        for name, degree in mesh.items():
            if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
                raise ValueError(f"paracompile: mesh degree for '{name}' must be a positive int, got {degree!r}")
        degrees = {name: mesh.get(name, 1) for name in MESH_DIM_NAMES}
        return _plan(world_size, degrees, explicit="ulysses" in mesh, device_mesh=None)
    if _is_device_mesh(mesh):
        names = mesh.mesh_dim_names
        if not names or any(name not in MESH_DIM_NAMES for name in names):
            raise ValueError(f"paracompile: a DeviceMesh's dims must be named among {list(MESH_DIM_NAMES)}; "
                             f"got {names}")
        degrees = {name: (mesh.size(names.index(name)) if name in names else 1) for name in MESH_DIM_NAMES}
        return _plan(world_size, degrees, explicit="ulysses" in names, device_mesh=mesh)
    raise ValueError(f"paracompile: option 'mesh' must be 'auto', a dict or a DeviceMesh; got {type(mesh).__name__}")


def _is_device_mesh(value: Any) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # torch built without distributed
        return False
    return isinstance(value, DeviceMesh)


def _plan(world_size: int, degrees: dict, explicit: bool, device_mesh) -> MeshPlan:
    total = degrees["batch"] * degrees["ring"] * degrees["ulysses"]
    if total > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"paracompile: mesh {degrees} needs {total} ranks, but no process group is initialised; "
                         "launch with torchrun and call torch.distributed.init_process_group() first")
    if total != world_size:
        raise ValueError(f"paracompile: the mesh degrees {degrees} multiply to {total}, but the world size is "
                         f"{world_size}")
    for name in ("ring", "batch"):
        if degrees[name] > 1:
            raise NotImplementedError(f"paracompile: the '{name}' mesh dim is not implemented yet; use a mesh of "
                                      "Ulysses degree only (e.g. {'ulysses': %d})" % world_size)
    if world_size == 1:
        return MeshPlan(1, degrees, None, explicit)
    if device_mesh is not None:
        process_group = device_mesh.get_group("ulysses")
        rank = device_mesh.get_local_rank("ulysses")
    else:
        process_group = dist.distributed_c10d._get_default_group()
        rank = dist.get_rank()
    group = ProcessGroupInfo(degrees["ulysses"], rank, process_group.group_name)
    return MeshPlan(world_size, degrees, group, explicit)
