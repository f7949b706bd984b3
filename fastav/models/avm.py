"""STELLA's audio-video matching (AVM) module: one bidirectional cross-attention layer and a matching head.

Inputs are the joint shared-layer outputs of the full clip without the final norm (``AVEncoder.joint_codes``):
``e_a`` (B, A, D) and ``e_v`` (B, V, D). Per modality a LayerNorm, then bias-free q, k, v maps (12 heads of 64
at base size, scale 1/8). Audio queries attend over video keys and video queries over audio keys (softmax with
no temperature); the outputs are mean-pooled over tokens and ``[video, audio]`` goes through
``Linear(2D, 2D) -> tanh -> Linear(2D, 1)`` to one matching logit. :meth:`AVMatching.project` exposes Q and K per
head, (B, H, L, E), for the importance and replay-correlation kernels, which never build the (B, H, A, V) logits.

The matching loss (:func:`matching_loss`) labels floor(B/2) random samples positive and the rest negative, gives
each negative the video codes of another negative (a derangement among them), runs the pairs through the joint
shared layers and takes BCE-with-logits. With B <= 2 every sample is positive, as in STELLA.

Deviations from the official code (``models/avm_module.py``, ``models/cl_methods/stella.py``):

- ``layout='standard'`` (default) concatenates the heads per token before pooling. STELLA reshapes the
  (B, H, L, E) attention output straight to (B, L, H*E) without moving the head axis, so each "token row" mixes
  consecutive (head, token) pairs; ``layout='official'`` reproduces that, for its released AVM weights.
- Negatives are deranged by one random cycle over the negative indices, drawn on the device (STELLA re-draws
  permutations on the host until none is a fixed point): no host synchronisation, still never a fixed point.

Shape suffixes: B batch, A audio tokens, V video tokens, D width, H heads, E head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastav.models.layers import attend, init_weights
from fastav.models.losses import at_least_fp32


@dataclass
class AVMProjections:
    """Per-head projections of both modalities, each (B, H, L, E)."""

    q_a: Tensor
    k_a: Tensor
    v_a: Tensor
    q_v: Tensor
    k_v: Tensor
    v_v: Tensor

    @property
    def scale(self) -> float:
        return self.q_a.shape[-1] ** -0.5


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x))


class MatchingHead(nn.Module):
    """``Linear(2D, 2D) -> tanh -> Linear(2D, 1)`` (STELLA's ``MatchingHead``; same parameter names)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pooler = Pooler(dim)
        self.fc = nn.Linear(dim, 1)

    def forward(self, u_B2D: Tensor) -> Tensor:
        return self.fc(self.pooler(u_B2D)).squeeze(-1)


class AVMatching(nn.Module):
    """Bidirectional cross-attention + matching head; parameter names follow STELLA's ``CrossModalAttention``."""

    def __init__(
        self, dim: int, num_heads: int, *, layout: Literal["standard", "official"] = "standard", backend: str = "sdpa"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AVM width {dim} is not a multiple of its {num_heads} heads")
        self.num_heads = num_heads
        self.layout = layout
        self.backend = backend
        self.norm_a, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_a_q, self.to_a_k, self.to_a_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_v_q, self.to_v_k, self.to_v_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.matching_score = MatchingHead(2 * dim)
        self.apply(init_weights)

    def _heads(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        return x_BLD.reshape(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

    def project(self, e_a_BAD: Tensor, e_v_BVD: Tensor) -> AVMProjections:
        """LayerNorm + q/k/v maps of both modalities, split into heads: each (B, H, L, E)."""
        x_a, x_v = self.norm_a(e_a_BAD), self.norm_v(e_v_BVD)
        return AVMProjections(
            self._heads(self.to_a_q(x_a)),
            self._heads(self.to_a_k(x_a)),
            self._heads(self.to_a_v(x_a)),
            self._heads(self.to_v_q(x_v)),
            self._heads(self.to_v_k(x_v)),
            self._heads(self.to_v_v(x_v)),
        )

    @staticmethod
    def cross_logits(proj: AVMProjections) -> tuple[Tensor, Tensor]:
        """The raw scaled logits S_av = Q_a K_v^T / sqrt(E), (B, H, A, V), and S_va, (B, H, V, A).

        Reference only (tests, small sizes): the selection kernels compute what they need from Q and K.
        """
        s_av = proj.q_a @ proj.k_v.transpose(-2, -1) * proj.scale
        s_va = proj.q_v @ proj.k_a.transpose(-2, -1) * proj.scale
        return s_av, s_va

    def _pool(self, out_BHLE: Tensor) -> Tensor:
        B, H, L, E = out_BHLE.shape
        if self.layout == "official":
            rows_BLD = out_BHLE.reshape(B, L, H * E)  # STELLA's reshape: the head axis is not moved first
        else:
            rows_BLD = out_BHLE.transpose(1, 2).reshape(B, L, H * E)
        return rows_BLD.mean(dim=1)

    def forward(self, e_a_BAD: Tensor, e_v_BVD: Tensor) -> Tensor:
        """Matching logits (B,): how likely each (audio, video) pair belongs together."""
        proj = self.project(e_a_BAD, e_v_BVD)
        o_a_BHAE = attend(proj.q_a, proj.k_v, proj.v_v, self.backend)  # audio queries over video keys
        o_v_BHVE = attend(proj.q_v, proj.k_a, proj.v_a, self.backend)
        u_B2D = torch.cat([self._pool(o_v_BHVE), self._pool(o_a_BHAE)], dim=-1)
        return self.matching_score(u_B2D)


def matching_pairs(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Labels (B,) float, 1 = matched, and the video index paired with each audio (B,) long.

    floor(B/2) random samples keep their own video; every other sample gets the video of another negative
    (one random cycle over the negatives, so no negative keeps its own). B <= 2: all positive.
    """
    labels_B = torch.ones(batch, device=device)
    video_ids_B = torch.arange(batch, device=device)
    if batch <= 2:
        return labels_B, video_ids_B
    neg_ids = torch.randperm(batch, device=device)[batch // 2 :]
    labels_B[neg_ids] = 0.0
    video_ids_B[neg_ids] = neg_ids.roll(1)
    return labels_B, video_ids_B


def matching_loss(
    avm: AVMatching,
    joint_codes: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    z_a_BAD: Tensor,
    z_v_BVD: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """L_AVM on one batch of codes: (loss, logits (B,), labels (B,)).

    ``joint_codes`` is ``AVEncoder.joint_codes``: the deranged pairs go through the joint shared layers (which
    mix the two modalities) before the AVM, as in STELLA's ``learn_multimodal_relationship``.
    """
    labels_B, video_ids_B = matching_pairs(z_a_BAD.shape[0], z_a_BAD.device)
    e_a, e_v = joint_codes(z_a_BAD, z_v_BVD[video_ids_B])
    logits_B = avm(e_a, e_v)
    logits = at_least_fp32(logits_B)
    return F.binary_cross_entropy_with_logits(logits, labels_B.to(logits.dtype)), logits_B, labels_B
