"""DTensor parameters (FSDP2): this rank's shards and the mesh's process group."""

from __future__ import annotations

import torch  # noqa: TID253 (this module is the adapter)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (e.g. a parameter of an FSDP2 model)."""
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def local_shard(t: torch.Tensor, what: str = "parameter") -> torch.Tensor:
    """This rank's shard of a DTensor sharded along one mesh dimension (its local tensor, the
    same storage: in-place updates write the DTensor), or ``t`` itself. ValueError for a
    replicated or partial placement, whose local tensor is not a disjoint piece of the whole
    (every rank would count its coordinates)."""
    if not is_dtensor(t):
        return t
    if t.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in t.placements):
        raise ValueError(
            f"a DTensor {what} must be sharded (Shard placement) on a 1-D device mesh, got placements "
            f"{tuple(t.placements)}; replicated or partial tensors would count their coordinates on every rank"
        )
    return t.to_local()


def mesh_group(params):
    """The process group of the DTensor parameters' device mesh (None if there are none);
    ValueError if they mix DTensors and plain tensors or live on different meshes."""
    ps = list(params)
    flags = [is_dtensor(p) for p in ps]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError("the parameters mix DTensors and plain tensors: shard all of them or none")
    meshes = {id(p.device_mesh) for p in ps}
    if len(meshes) > 1:
        raise ValueError("the DTensor parameters live on different device meshes")
    return ps[0].device_mesh.get_group()
