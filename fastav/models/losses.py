"""Pre-training losses: masked reconstruction with per-patch normalised targets, and InfoNCE across ranks.

Both are computed in fp32 (or fp64) whatever the input dtype, and neither reads a value back to the host.

Deviation from CAV-MAE: its DataParallel computed InfoNCE per GPU sub-batch and summed the four losses
(docs/methods/cav_mae.md); here each rank averages over its own anchors, against negatives from every rank
(``gather=True``, STELLA) or from its local batch only (``gather=False``, CAV-MAE's negatives), and the
data-parallel gradient average takes the place of the sum.

With gathered negatives, STELLA back-propagates each rank's own rows only: a row loses the push of the other ranks'
anchors while keeping the pull of its own positive, so every rank's rows are drawn together, a pull that outweighs
the alignment signal of an untrained model and collapses its pooled features. ``gather_grad=True`` sends the
gradients of the gathered rows back to their ranks, and the data-parallel average then is the gradient of one
InfoNCE over the gathered batch (what a single process with the whole batch computes).

Shape suffixes: B local batch, G gathered batch (all ranks), K tokens, P patch vector length, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 when it is in a 16-bit float type (fp64 stays fp64, for gradient checks)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_mse(pred_BKP: Tensor, target_BKP: Tensor, mask_BK: Tensor, norm_pix: bool) -> Tensor:
    """Mean over hidden tokens (``mask_BK`` = 1) of the per-patch mean squared error.

    With ``norm_pix`` each target patch is standardised by its own mean and (unbiased) variance, eps 1e-6 on the
    variance, as MAE / CAV-MAE / STELLA.
    """
    target = at_least_fp32(target_BKP)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch_BK = (at_least_fp32(pred_BKP) - target).pow(2).mean(dim=-1)
    mask = mask_BK.to(per_patch_BK.dtype)
    return (per_patch_BK * mask).sum() / mask.sum().clamp_min(1.0)  # no hidden patch: 0, not 0/0


class _AllGatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; the backward sums the gradients of every rank and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x_BD: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x_BD.contiguous())
        ctx.rows = slice(dist.get_rank() * x_BD.shape[0], (dist.get_rank() + 1) * x_BD.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_GD: Tensor) -> Tensor:  # type: ignore[override]
        grad_GD = grad_GD.contiguous()
        dist.all_reduce(grad_GD)
        return grad_GD[ctx.rows]


def gather_with_grad(x_BD: Tensor, *, every_rank: bool = False) -> tuple[Tensor, int]:
    """All ranks' rows concatenated in rank order, (G, D), and this rank's offset in them.

    Default: the other ranks' rows are constants; the local slice is the input itself, so gradients flow into it
    (STELLA's ``concat_all_gather`` with the local slice re-inserted). ``every_rank``: gradients with respect to
    every row go back to the rank that holds it (summed over ranks), so that the data-parallel average of the
    per-rank losses has the gradient of one loss over the gathered batch. Every rank must pass the same B.
    Without an initialised process group (or with one rank) this returns ``(x_BD, 0)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_BD, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    if every_rank:
        return _AllGatherRows.apply(x_BD), rank * x_BD.shape[0]
    parts = [torch.empty_like(x_BD) for _ in range(world)]
    dist.all_gather(parts, x_BD.detach().contiguous())
    parts[rank] = x_BD
    return torch.cat(parts, dim=0), rank * x_BD.shape[0]


def info_nce(
    a_BD: Tensor,
    v_BD: Tensor,
    *,
    tau: float = 0.05,
    bidirectional: bool = False,
    gather: bool = True,
    gather_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """InfoNCE between paired audio and video embeddings (L2-normalised here); returns (loss, accuracy).

    The video->audio direction (CAV-MAE's single direction): each video anchor picks its own audio among all
    audios (of every rank with ``gather``). ``bidirectional`` averages it with audio->video (STELLA).
    The accuracy is that of the video->audio direction. ``gather_grad``: the gathered rows carry their gradients
    back to the ranks that hold them (:func:`gather_with_grad` with ``every_rank``).
    """
    a_BD = F.normalize(at_least_fp32(a_BD), dim=-1)
    v_BD = F.normalize(at_least_fp32(v_BD), dim=-1)
    a_GD, offset = gather_with_grad(a_BD, every_rank=gather_grad) if gather else (a_BD, 0)
    target_B = torch.arange(a_BD.shape[0], device=a_BD.device) + offset
    logits_va_BG = v_BD @ a_GD.t() / tau
    loss = F.cross_entropy(logits_va_BG, target_B)
    acc = (logits_va_BG.argmax(dim=1) == target_B).float().mean()
    if bidirectional:
        v_GD, _ = gather_with_grad(v_BD, every_rank=gather_grad) if gather else (v_BD, 0)
        loss = 0.5 * (loss + F.cross_entropy(a_BD @ v_GD.t() / tau, target_B))
    return loss, acc
