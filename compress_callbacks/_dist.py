"""Tiny wrappers over ``torch.distributed`` that are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "broadcast_", "all_reduce_"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _through_backend(tensor: torch.Tensor, fn) -> torch.Tensor:
    """Run ``fn`` on a copy the backend accepts (gloo has no bool; NCCL needs the GPU)."""
    backend = dist.get_backend()
    device = tensor.device
    if backend == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    work = tensor
    if tensor.dtype == torch.bool:
        work = tensor.to(torch.uint8)
    work = work.to(device)
    fn(work)
    if work is not tensor:
        tensor.copy_(work.to(tensor.device, tensor.dtype))
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Make every rank hold rank ``src``'s ``tensor`` (in place)."""
    if world_size() == 1:
        return tensor
    return _through_backend(tensor, lambda t: dist.broadcast(t, src=src))


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce with ``op`` in {"sum", "min", "max"}."""
    if world_size() == 1:
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    return _through_backend(tensor, lambda t: dist.all_reduce(t, op=ops[op]))


# ------------------------------------------------------------------ FSDP2 (DTensor) weights
# FSDP2 (``fully_shard``, also what Accelerate's FSDP plugin builds with ``fsdp_version=2``) turns
# each parameter into a DTensor sharded along dim 0 over a 1-D device mesh: every rank holds a
# contiguous block of rows. These helpers let per-weight state (masks) live on the local block.


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch without distributed
    _DTensor = ()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel parameter, gradient or state)."""
    return isinstance(tensor, _DTensor)


def supported_sharding(param: torch.Tensor) -> bool:
    """FSDP2's layout: a DTensor sharded along dim 0 over a 1-D mesh of all ranks (plain ``fully_shard``;
    QAT's range reduction and DDP-style agreement run over all ranks)."""
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    return mesh.ndim == 1 and mesh.size() == world_size() and tuple(param.placements) == (Shard(0),)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def gather_like(local_block: torch.Tensor, param: torch.Tensor, rows_only: bool = False) -> torch.Tensor:
    """The whole tensor whose blocks, laid out like ``param``'s, the ranks hold as ``local_block``
    (``rows_only``: one value per row of ``param``)."""
    if not is_sharded(param):
        return local_block
    shape = (param.shape[0],) if rows_only else tuple(param.shape)
    stride = torch.empty(shape, device="meta").stride()
    work = local_block.to(torch.uint8) if local_block.dtype == torch.bool else local_block
    whole = _DTensor.from_local(work, param.device_mesh, param.placements, run_check=False,
                                shape=shape, stride=stride).full_tensor()
    return whole.to(local_block.dtype)


def local_block_of(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``whole`` (same on every rank), laid out like ``param``: a copy."""
    if not is_sharded(param):
        return whole
    mesh = param.device_mesh
    blocks = torch.chunk(whole, mesh.size(), dim=0)  # DTensor's Shard(0) layout
    index = mesh.get_local_rank()
    block = blocks[index] if index < len(blocks) else whole[:0]
    return block.contiguous().clone()


def sum_over_shards(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks that hold ``param``'s blocks (unchanged if not sharded)."""
    if not is_sharded(param):
        return values
    group = param.device_mesh.get_group()
    return _through_backend(values, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))


def gather_over_shards(values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``values`` of every rank that holds a block of ``param``, stacked in block order."""
    group = param.device_mesh.get_group()
    work = values.to(local(param).device)  # where this mesh's backend exchanges tensors (NCCL: the GPU)
    parts = [torch.empty_like(work) for _ in range(param.device_mesh.size())]
    dist.all_gather(parts, work, group=group)
    return torch.stack(parts).to(values.device)
