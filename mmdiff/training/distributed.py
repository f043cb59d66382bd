"""Data parallel over ``torch.distributed`` (gloo on CPU, nccl on GPU): process group, parameter
broadcast and gradient averaging, shared by ``mmdiff train`` and ``mmdiff train-adapter``."""
from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def sync_params(params: list[torch.Tensor], world: int) -> None:
    """Broadcast rank 0's parameters so every replica starts identical."""
    if world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients over replicas (one flat all-reduce)."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(g).clone()
        off += n
