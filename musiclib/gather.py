"""All-gather across DDP workers with gradients, so each worker contrasts against the global batch.

The same role as SimCLR's ``modules/gather.py``: without a process group every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every worker's gradient and returns this worker's slice.

    Worker r's loss depends on every worker's projections, so the gradient of z_r is the sum over workers
    of d(loss_q)/d(z_r); an all-reduce of the full gradient gives it (gloo and NCCL alike).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers (rank order), with gradients flowing back to each worker."""
    return _GatherWithGrad.apply(x) if distributed()[1] > 1 else x


def gather_constant(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor that needs no gradient (labels, clip ids) from all workers."""
    if distributed()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
