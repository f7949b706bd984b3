"""Fixtures for the kernel tests: the device the Triton path runs on, and shared assertion helpers.

Under ``TRITON_INTERPRET=1`` (set before ``kernels`` is imported: on the command line, or by tests/conftest.py
when there is no GPU) the kernels run on CPU tensors; without the interpreter they are compiled and the same
tests run on CUDA tensors. Tests that need the Triton path skip when neither is possible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from kernels import _utils
from kernels.attention_importance import _row_stats

INTERPRETED = _utils.is_interpreted(_row_stats.kernel)


@pytest.fixture
def device() -> str:
    """Where the Triton path can run: "cpu" under the interpreter, else "cuda" (skip when neither)."""
    if INTERPRETED:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 set before importing kernels")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """torch.testing.assert_close with a report of the max / mean absolute and relative differences."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    rel = diff / e.abs().clamp_min(1e-30)
    msg = (
        f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
        f"max rel diff {rel.max().item():.3e} (rtol {rtol}, atol {atol}), shape {tuple(actual.shape)}"
    )
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol, msg=msg)


def exact_inclusion(weights: list[float], k: int) -> list[float]:
    """P(item i among the first k draws) of sequential sampling without replacement in proportion to weights.

    Enumerates every ordered k-tuple of distinct items (Plackett–Luce probability of that prefix).
    """
    n = len(weights)
    total = sum(weights)
    probs = [0.0] * n
    for seq in itertools.permutations(range(n), k):
        p, left = 1.0, total
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        for i in seq:
            probs[i] += p
    return probs


def inclusion_z(counts: torch.Tensor, draws: int, probs: list[float]) -> float:
    """Largest |z| over items of the observed inclusion counts against ``probs`` (binomial standard error)."""
    z = 0.0
    for c, p in zip(counts.tolist(), probs, strict=True):
        sd = math.sqrt(max(p * (1 - p), 1e-12) / draws)
        z = max(z, abs(c / draws - p) / sd)
    return z


@pytest.fixture
def close() -> Callable[..., None]:
    return assert_close


@pytest.fixture
def inclusion() -> tuple[Callable[..., list[float]], Callable[..., float]]:
    return exact_inclusion, inclusion_z
