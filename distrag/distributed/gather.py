"""A tensor of every trainer, gathered with gradient: MNRL's candidate passages of the global batch.

sentence-transformers' ``gather_across_devices`` gathers the embeddings of all devices so that a question's
in-batch negatives are the whole batch's; :func:`gather_with_grad` is that collective for distrag's trainers.
Each trainer then computes the loss of its own questions against every trainer's candidates. The backward sums
the gradient of the gathered tensor over the trainers and hands each trainer the rows it contributed: trainer
``r``'s loss also depends on the other trainers' candidates, and that part of its gradient belongs to the
trainer whose encoder produced them. After the trainers' all-reduce (mean) of the encoder's gradients, the
update equals one process training on the global batch.

Written as an autograd function of its own (forward: all-gather, backward: all-reduce SUM, then this trainer's
rows) rather than ``torch.distributed.nn.functional.all_gather``, which is deprecated and on gloo emulates a
reduce-scatter with all-to-all; the embeddings are small (rows x dim), so all-reducing the whole gradient costs
little.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """Forward: every trainer's rows (padded to the longest for ``all_gather``), concatenated in trainer order.
    Backward: the gradient of the whole result summed over the trainers; this trainer's rows of it."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group) -> Tensor:  # noqa: ANN001
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: Tensor, group=None) -> tuple[Tensor, int]:  # noqa: ANN001
    """Every trainer's ``x`` (``[rows, ...]``; the number of rows may differ, the rest of the shape and the dtype
    may not), concatenated in trainer order, and the row where this trainer's own start.

    A collective of the trainers' group (``group``, default the default group): every trainer calls it, in the
    same order, and when ``x`` needs a gradient every trainer back-propagates through the result (the backward is
    a collective too). Without a gradient it is a plain all-gather."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    sizes = [int(c) for c in counts]
    return _GatherRows.apply(x.contiguous(), sizes, rank, group), sum(sizes[:rank])
