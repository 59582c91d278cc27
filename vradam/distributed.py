"""VRAdam on sharded parameters: step the local shards, add up s_t with one all-reduce.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) and any other DTensor
layout, a rank holds only a shard of each parameter, of its gradient and of
its moments. Everything in the update is elementwise except the gate
``s_t = sum |x|^power``, a sum over every entry of every parameter. So each
rank steps its local shards with no communication, and s_t is the sum over
ranks of the local sums::

    local[k] = sum of |x|^power over this rank's counted shards of group k
    s[k]     = all_reduce(local, SUM)[k]               one collective per step
    s        = s[0] + ... + s[G-1]                     norm_scope="global"

The vector ``local`` holds one entry per param group, so the one all-reduce
serves both norm scopes; every rank ends with the same s_t and hence the same
eta_t, telemetry included. It is a device tensor: no host sync.

Which ranks are summed over (all DTensor parameters must share one mesh):

* A parameter is *sharded* over the mesh dimensions where its placement is
  ``Shard`` (or ``_StridedShard``, as FSDP + TP uses); the reduced dimensions
  are the union of these over all parameters. FSDP on a 1-D mesh: that
  dimension. HSDP, placements ``(Replicate, Shard)``: the shard dimension only;
  the replicas hold the same shards and each computes the same s_t alone
  (summing over them too would count every entry once per replica).
  FSDP + TP: both dimensions.
* A parameter ``Replicate`` on a reduced dimension (a norm weight under
  FSDP + TP), or a plain tensor among DTensors, is held whole by every rank
  along it; it is counted only by the rank at coordinate 0 there (the others
  add nothing, which is exact).
* ``Partial`` placements are refused: a local summand's |x|^power does not add
  up to the whole's.
* With no DTensor parameter there is nothing to reduce: plain tensors (DDP,
  single process) are whole on every rank, and DDP has already averaged the
  gradients, so every rank computes the full s_t by itself.

The collective runs over the process group of the one reduced mesh dimension
(FSDP, HSDP), over the default group when the reduced dimensions are the whole
mesh and the mesh is every rank (FSDP + TP on all ranks), and otherwise once
per reduced dimension. Every rank must call the step, as with any collective.

Example (one process, so nothing is sharded and nothing is reduced)::

    >>> import torch
    >>> from vradam.distributed import local_shards
    >>> from vradam.group import GroupTensors
    >>> group = GroupTensors([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)],
    ...                      [torch.zeros(2)], [torch.tensor(0.0)], lr=0.1, beta1=0.9,
    ...                      beta2=0.999, beta3=1.0, alpha1=10.0, eps=1e-8, weight_decay=0.0)
    >>> groups, reduction = local_shards([group])
    >>> groups[0] is group, reduction
    (True, None)
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch
from torch import Tensor

from vradam.group import GroupTensors

__all__ = ["ShardedNorm", "all_reduce_sums", "is_dtensor", "local_shards"]


def all_reduce_sums(local_sums: Tensor, process_groups: tuple[Any, ...]) -> Tensor:
    """Sum ``local_sums`` elementwise over the ranks of each process group, in place.

    ``None`` in ``process_groups`` is the default group. One collective per
    entry; :func:`local_shards` gives one entry except for sharding over a
    proper subset of several mesh dimensions.
    """
    for group in process_groups:
        torch.distributed.all_reduce(local_sums, op=torch.distributed.ReduceOp.SUM, group=group)
    return local_sums


@dataclasses.dataclass(frozen=True)
class ShardedNorm:
    """How the local partial sums of s_t become the global ones: call it on them."""

    process_groups: tuple[Any, ...]
    reduced_dims: tuple[int, ...]  # mesh dimensions summed over

    def __call__(self, local_sums: Tensor) -> Tensor:
        return all_reduce_sums(local_sums, self.process_groups)


def _dtensor_module():
    """``torch.distributed.tensor`` if something imported it, else None.

    No DTensor can exist before that module is imported, so plain runs never pay
    for importing it.
    """
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(t: object) -> bool:
    """True when ``t`` is a DTensor (without importing ``torch.distributed.tensor``)."""
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def _where(gi: int, i: int, p: Tensor) -> str:
    return f"group {gi}, parameter {i} (shape {tuple(p.shape)})"


def _sharded_dims(placements, gi: int, i: int, p: Tensor, module) -> tuple[int, ...]:
    """The mesh dimensions over which a DTensor's entries are split among ranks."""
    strided = getattr(module.placement_types, "_StridedShard", ())
    dims = []
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() or isinstance(placement, strided):
            dims.append(dim)
            continue
        kind = "Partial" if placement.is_partial() else type(placement).__name__
        raise ValueError(
            f"{_where(gi, i, p)} has placement {placement} ({kind}) on mesh dimension {dim}; "
            "allowed: Shard or Replicate (redistribute a Partial tensor before stepping)"
        )
    return tuple(dims)


def local_shards(groups: list[GroupTensors]) -> tuple[list[GroupTensors], ShardedNorm | None]:
    """The groups with every DTensor replaced by its local shard, and how to reduce s_t.

    Returns the groups unchanged and None when no parameter is a DTensor, or
    when no parameter is sharded (all ``Replicate``). Otherwise each group's
    ``counted`` says which local tensors this rank adds to s_t (module
    docstring), and the :class:`ShardedNorm` sums the local sums over the ranks
    that hold different shards. Raises ValueError for DTensor parameters on
    different meshes, Partial placements, or a gradient or moment whose mesh or
    placements differ from its parameter's.
    """
    module = _dtensor_module()
    if module is None:
        return groups, None
    dtensor = module.DTensor
    if not any(isinstance(p, dtensor) for g in groups for p in g.params):
        return groups, None

    mesh = None
    sharded: list[list[tuple[int, ...] | None]] = []  # per parameter; None: a plain tensor
    for gi, g in enumerate(groups):
        row = []
        for i, (p, grad, v, m) in enumerate(zip(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs)):
            if not isinstance(p, dtensor):
                if isinstance(grad, dtensor) or isinstance(v, dtensor) or isinstance(m, dtensor):
                    raise ValueError(
                        f"{_where(gi, i, p)} is a plain tensor with a DTensor gradient or "
                        "moment; allowed: all four DTensors or all four plain tensors"
                    )
                row.append(None)
                continue
            placements = p.placements
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh is not mesh and p.device_mesh != mesh:
                raise ValueError(
                    f"{_where(gi, i, p)} lives on {p.device_mesh}, an earlier parameter on "
                    f"{mesh}; allowed: every DTensor parameter on one DeviceMesh, so that one "
                    "all-reduce adds up the velocity norm"
                )
            for name, t in (("gradient", grad), ("exp_avg", v), ("exp_avg_sq", m)):
                if not isinstance(t, dtensor) or t.placements != placements or (
                    t.device_mesh is not mesh and t.device_mesh != mesh
                ):
                    layout = (f"has {t.placements} on {t.device_mesh}" if isinstance(t, dtensor)
                              else "is a plain tensor")
                    raise ValueError(
                        f"{_where(gi, i, p)} has placements {placements} on {mesh} but its "
                        f"{name} {layout}; allowed: the parameter's mesh and placements"
                    )
            row.append(_sharded_dims(placements, gi, i, p, module))
        sharded.append(row)

    reduced = tuple(sorted({d for row in sharded for dims in row if dims for d in dims}))
    if not reduced:
        return [_localized(g, None) for g in groups], None
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"this rank is not in the parameters' mesh {mesh}; allowed: a rank of it")

    def counted(dims: tuple[int, ...] | None) -> bool:
        """Counted here unless held whole along a reduced dimension where this rank is not first."""
        return all(coordinate[d] == 0 for d in reduced if d not in (dims or ()))

    local = [
        _localized(g, [counted(dims) for dims in row]) for g, row in zip(groups, sharded)
    ]
    return local, ShardedNorm(_process_groups(mesh, reduced), reduced)


def _localized(g: GroupTensors, counted: list[bool] | None) -> GroupTensors:
    """A copy of the group whose tensors are the local shards (aliases: updates land in place)."""
    with torch.no_grad():  # to_local() is then the shard itself, not an autograd view of it
        params = [_local(p) for p in g.params]
        grads = [_local(t) for t in g.grads]
        exp_avgs = [_local(t) for t in g.exp_avgs]
        exp_avg_sqs = [_local(t) for t in g.exp_avg_sqs]
    if counted is not None and g.counted is not None:
        counted = [a and b for a, b in zip(counted, g.counted)]
    elif counted is None:
        counted = g.counted
    if counted is not None and all(counted):
        counted = None
    return dataclasses.replace(
        g, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, counted=counted
    )


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def _process_groups(mesh, reduced: tuple[int, ...]) -> tuple[Any, ...]:
    """The process group(s) whose all-reduce sums over the reduced mesh dimensions."""
    if len(reduced) == 1:
        return (mesh.get_group(reduced[0]),)
    if len(reduced) == mesh.ndim and mesh.size() == torch.distributed.get_world_size():
        return (None,)  # the whole mesh is every rank: the default group
    return tuple(mesh.get_group(d) for d in reduced)
