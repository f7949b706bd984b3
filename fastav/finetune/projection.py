"""MLA's head gradient modification: an OWM-style projector P that keeps the shared head's weight update away from
the mean features of the modalities trained before.

With the shared head ``W`` (C x d) and a projector ``P`` (d x d, the identity at first, one for all modalities,
kept for the whole run), each unimodal step except the very first one:

1. ``h`` = the mean over the batch (all ranks) of the features z of the modality being trained;
2. ``k = P h``; ``P <- P - k k^T / (alpha + h^T k)``; ``P <- P / ||P||_F`` (``normalize=True``);
3. the weight gradient becomes ``grad_W P``; the bias gradient is left alone.

From the identity, the update (before normalising) maps ``h`` to ``h * alpha / (alpha + |h|^2)`` and leaves every
direction orthogonal to ``h`` as it is: a gradient row keeps its component orthogonal to ``h`` and loses all but
that fraction of its component along ``h``, so the update hardly changes the head's response to the mean
feature. Every update shrinks P along the newest mean feature and keeps what it learned about the older ones.

How fastav applies it: the projection is part of the autograd graph (:func:`project_gradient`, identity in the
forward pass, ``grad @ P`` in the backward pass), so the gradient that reaches the head's weight, and DeepSpeed's
gradient hooks and ZeRO buffers after it, is already projected; nothing is rewritten between backward and step.
P is updated just before the head is applied, from the current step's mean feature, then used for that step's
gradient: the order of the official code's ``before_update`` (P updated with the current modality's feature before
the current gradient is projected). The mean is all-reduced so every rank holds the same P.

Where the paper is implemented rather than the official code: the official ``GSPlugin.before_update`` only acts on
a parameter named ``module.weight``, which an ``nn.Linear`` never has, so its projection never runs; its P is a
hard-coded 512 x 512 (it would fail on 768-d heads); and its denominator ``alpha + k r`` is an outer product
(d x d, divided elementwise) where OWM and the paper have the scalar ``alpha + h^T k``. fastav runs the projection
on the head's weight, sizes P to the head's input width and uses the scalar denominator.

References: Zhang et al., "Multimodal Representation Learning by Alternating Unimodal Adaptation", CVPR 2024;
Zeng et al., "Continual learning of context-dependent processing in neural networks" (OWM), Nature MI 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HeadProjector:
    """The projector P (d x d, fp32) and its update; a plain object (state saved per rank by the method: every rank
    holds the same values, updated from all-reduced means)."""

    def __init__(self, dim: int, *, normalize: bool = True, device: torch.device | str = "cpu") -> None:
        self.P = torch.eye(dim, device=device)
        self.normalize = normalize

    @torch.no_grad()
    def update(self, mean_D: Tensor, alpha: float) -> None:
        """Shrink P along ``mean_D`` (the batch-mean feature of the modality being trained)."""
        h = mean_D.to(self.P.dtype).reshape(-1)
        k = self.P @ h
        P = self.P - torch.outer(k, k) / (alpha + h @ k)
        if self.normalize:
            P = P / torch.linalg.matrix_norm(P)
        self.P = P

    def state_dict(self) -> dict[str, Tensor]:
        return {"P": self.P.detach().cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.P = state["P"].to(self.P.device, torch.float32)


def alpha_at(base: float, batch: int, batches_per_epoch: int) -> float:
    """``base ** (1 + i / N)``: 0.1 -> 0.01 over each epoch for MLA's base 0.1, back to 0.1 at the next."""
    return base ** (1.0 + batch / max(batches_per_epoch, 1))


class _ProjectGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_CD: Tensor, P_DD: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(P_DD)
        return weight_CD.view_as(weight_CD)

    @staticmethod
    def backward(ctx, grad_CD: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (P_DD,) = ctx.saved_tensors
        return (grad_CD.to(P_DD.dtype) @ P_DD).to(grad_CD.dtype), None


def project_gradient(weight_CD: Tensor, P_DD: Tensor) -> Tensor:
    """``weight_CD`` unchanged in the forward pass; its gradient right-multiplied by ``P_DD`` in the backward pass."""
    return _ProjectGrad.apply(weight_CD, P_DD)
