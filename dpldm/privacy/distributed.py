"""DP-SGD over several processes (DDP): the noise of one logical batch is added once, not once per rank.

With W ranks, each holding the clipped sum s_r = sum_{i in rank r} c_i g_i of its local Poisson batch:

  rank 0:   s_0 + N(0, sigma^2 C^2 I)          other ranks:   s_r
  all-reduce (sum):  g = sum_r s_r + N(0, sigma^2 C^2 I)        identical on every rank
  divide by the global expected batch size B = qN, step.

Noise added on every rank before the sum would have variance W sigma^2 C^2 (W times what is accounted:
wasted utility); each rank noising only its own local sum (Opacus under DDP, unhandled) leaves W different
models. Opacus's DistributedDPOptimizer does the same as this mixin for its
hooks path; the mixin serves both of dpldm's optimizers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from opacus.optimizers.optimizer import _mark_as_processed


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place, with one collective over a flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class GlobalBatchNoise:
    """Mixin for an Opacus ``DPOptimizer``: noise once for the global batch, then the sum over ranks.

    On one process it is the plain DPOptimizer. ``expected_batch_size`` must be the global B.
    """

    def add_noise(self) -> None:
        rank, size = world()
        if size == 1:
            super().add_noise()
            return
        if rank == 0:
            super().add_noise()  # p.grad = s_0 + noise
        else:
            for p in self.params:
                p.grad = p.summed_grad.view_as(p).clone()
                _mark_as_processed(p.summed_grad)
        all_reduce_sum([p.grad for p in self.params])
