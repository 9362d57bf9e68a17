"""All-gather across DDP workers, so each worker contrasts its views against the global batch.

The role of SimCLR's ``modules/gather.py``, with PyTorch's differentiable all-gather: worker r's loss
depends on every worker's projections, so the gradient of z_r sums d(loss_q)/d(z_r) over the workers q,
which the backward of ``torch.distributed.nn.functional.all_gather`` computes (the two-process test in
``tests/test_pretrain.py`` checks it against one worker on the whole batch). Without a process group every
function here is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def distributed() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all workers (rank order), with gradients flowing back to each worker."""
    return torch.cat(dist_nn.all_gather(x.contiguous())) if distributed()[1] > 1 else x


def gather_constant(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor that needs no gradient (labels, clip ids) from all workers."""
    if distributed()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
