"""STELLA's per-step patch selection, composed from the fused ops: what the continual method calls.

Legend (shape suffixes): B = batch rows (current + replay), L = patches of one modality, k = patches kept.

- ``select_video``: prune the importance with Bernoulli(π_v) (``prune_weights``), then draw k patches without
  replacement in proportion to what is left (``weighted_sample``) (docs/methods/stella.md).
- ``select_audio``: Bernoulli(π_a) pruned mask (``bernoulli_prune``), then the chunked time selection
  (``chunk_select``) (docs/methods/stella.md).
- ``deterministic=True``: the first step while the replay buffer is empty (docs/methods/stella.md): top-k by importance,
  no pruning, no chunking (π is ignored and may be None).

Both return the kept patch ids (B, k) int64 in ascending order, ready for ``gather_*_patches`` and for gathering
positional embeddings. Every piece runs on the device with static shapes and no host value on either path;
the rows of replay samples simply use their stored I and π (concatenate before calling).

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§4, multimodal patch selection).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kernels.chunk_select import chunk_select, chunk_select_ref
from kernels.weighted_sample import (
    bernoulli_prune,
    bernoulli_prune_ref,
    prune_weights,
    prune_weights_ref,
    topk_indices,
    topk_indices_ref,
    weighted_sample,
    weighted_sample_ref,
)

__all__ = ["select_audio", "select_audio_ref", "select_video", "select_video_ref"]


class _Ops(NamedTuple):
    """The ops a selection is composed of: the dispatching ones, or the references (same draws, same ids)."""

    topk_indices: Callable[..., torch.Tensor]
    prune_weights: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    weighted_sample: Callable[..., torch.Tensor]
    bernoulli_prune: Callable[..., torch.Tensor]
    chunk_select: Callable[..., tuple[torch.Tensor, torch.Tensor]]


_DISPATCH = _Ops(topk_indices, prune_weights, weighted_sample, bernoulli_prune, chunk_select)
_REF = _Ops(topk_indices_ref, prune_weights_ref, weighted_sample_ref, bernoulli_prune_ref, chunk_select_ref)


def _check_pi(importance: torch.Tensor, pi: torch.Tensor | None, deterministic: bool) -> None:
    if not deterministic and (pi is None or pi.shape != importance.shape):
        got = None if pi is None else tuple(pi.shape)
        raise ValueError(f"pi must have the importance shape {tuple(importance.shape)}, got {got}")


def _select_video(
    ops: _Ops,
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    deterministic: bool,
    stream: int,
) -> torch.Tensor:
    _check_pi(importance, pi, deterministic)
    if deterministic:
        return ops.topk_indices(importance, k).sort(dim=1).values
    kept_weights, _ = ops.prune_weights(importance, pi, rng, stream=stream)
    return ops.weighted_sample(kept_weights, k, rng, stream=stream).sort(dim=1).values


def _select_audio(
    ops: _Ops,
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    chunk_times: int,
    freq_patches: int,
    deterministic: bool,
    stream: int,
) -> torch.Tensor:
    _check_pi(importance, pi, deterministic)
    if deterministic:
        return ops.topk_indices(importance, k).sort(dim=1).values
    pruned = ops.bernoulli_prune(pi, rng, stream=stream)
    ids, _ = ops.chunk_select(
        importance, pruned, k, rng, chunk_times=chunk_times, freq_patches=freq_patches, stream=stream
    )
    return ids


@torch.no_grad()
def select_video(
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    *,
    deterministic: bool = False,
    stream: int = 0,
) -> torch.Tensor:
    """Video patches to keep: (B, L) importance I_v and pruning probabilities π_v -> (B, k) ids, ascending.

    ``stream`` separates this call's random numbers from other calls sharing ``rng`` in the step (video uses
    stream 0 and audio stream 1 by default).
    """
    return _select_video(_DISPATCH, importance, pi, k, rng, deterministic, stream)


def select_video_ref(
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    *,
    deterministic: bool = False,
    stream: int = 0,
) -> torch.Tensor:
    """Reference of :func:`select_video`: the same draws, so the same ids up to float rounding of the keys."""
    return _select_video(_REF, importance, pi, k, rng, deterministic, stream)


@torch.no_grad()
def select_audio(
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
    deterministic: bool = False,
    stream: int = 1,
) -> torch.Tensor:
    """Audio patches to keep: (B, L) importance I_a (time-major) and π_a -> (B, k) ids, ascending."""
    return _select_audio(_DISPATCH, importance, pi, k, rng, chunk_times, freq_patches, deterministic, stream)


def select_audio_ref(
    importance: torch.Tensor,
    pi: torch.Tensor | None,
    k: int,
    rng: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
    deterministic: bool = False,
    stream: int = 1,
) -> torch.Tensor:
    """Reference of :func:`select_audio`: the same draws, so the same ids up to float rounding of the keys."""
    return _select_audio(_REF, importance, pi, k, rng, chunk_times, freq_patches, deterministic, stream)
