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
