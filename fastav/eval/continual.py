"""Continual-learning metrics over retrieval results taken after every task.

After task t (t = 1..T) the model is evaluated on the whole retrieval set; ``a[t, k]`` is the R@K (percent) of the
queries of task k's category, for one direction ('a2v' or 'v2a') and one K. The rows form the accuracy matrix
(T x T; entries for k > t measure tasks not trained yet and are kept, as STELLA's tables do).

- **Average** = mean over k = 1..T of ``a[T, k]``: the final model on every category.
- **Forgetting** (the standard definition, Chaudhry et al. 2018) = mean over k = 1..T-1 of
  ``max_{t = 1..T-1} a[t, k] - a[T, k]``: how far each earlier category fell from its best earlier value. Not
  clipped at 0 (a category that improved at the end counts negative). Undefined (None) for T = 1.
- **Forgetting (official code)**: STELLA's result scripts sum the same differences over k = 1..T, the last task
  included (a term <= 0 when the last task is learnt best at the end), and divide by T - 1; reported beside the
  standard one and labelled as such, so that numbers can be put next to the paper's.

STELLA's summary columns average each of these over R@1, R@5 and R@10 for one direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def accuracy_matrix(
    results: Sequence[Mapping[str, Any]], tasks: Sequence[str], *, direction: str, metric: str
) -> np.ndarray:
    """``a[t, k]`` from the retrieval results after tasks 1..t (each :func:`fastav.eval.retrieval_metrics`
    output); a category with no query is NaN."""
    out = np.full((len(results), len(tasks)), np.nan)
    for t, result in enumerate(results):
        groups = result[direction]["groups"]
        for k, name in enumerate(tasks):
            if name in groups:
                out[t, k] = groups[name][metric]
    return out


def average(matrix: np.ndarray) -> float:
    """Mean of the last row (the final model on every category)."""
    return float(np.nanmean(matrix[-1]))


def _drops(matrix: np.ndarray, columns: int) -> np.ndarray:
    """max_{t < T} a[t, k] - a[T, k] for the first ``columns`` categories that have queries (no NaN column)."""
    T = matrix.shape[0]
    m = matrix[:, :columns]
    m = m[:, ~np.isnan(m).any(axis=0)]  # a category with no query is NaN in every row
    return m[: T - 1].max(axis=0) - m[T - 1]


def forgetting(matrix: np.ndarray) -> float | None:
    """Standard forgetting: mean over k < T of max_{t < T} a[t, k] - a[T, k]; None before a second task.
    Categories without queries (NaN) are left out; NaN when no category is left."""
    T = matrix.shape[0]
    if T < 2:
        return None
    drops = _drops(matrix, T - 1)
    return float(np.mean(drops)) if drops.size else float("nan")


def forgetting_official(matrix: np.ndarray) -> float | None:
    """STELLA's result scripts: the sum over every category k = 1..T (the last one included) of
    max_{t < T} a[t, k] - a[T, k], divided by T - 1, unclipped; None before a second task. Categories without
    queries (NaN) add nothing to the sum."""
    T = matrix.shape[0]
    if T < 2:
        return None
    return float(np.sum(_drops(matrix, T)) / (T - 1))


def continual_summary(results: Sequence[Mapping[str, Any]], tasks: Sequence[str], ks: Sequence[int]) -> dict[str, Any]:
    """Every matrix and figure of a run: per direction, per K: the matrix, Average, Forgetting (both
    definitions); and per direction the mean of those over the Ks (STELLA's summary columns)."""
    out: dict[str, Any] = {"tasks": list(tasks), "ks": list(ks), "trained": len(results)}
    for direction in ("a2v", "v2a"):
        per_k: dict[str, Any] = {}
        for k in ks:
            m = accuracy_matrix(results, tasks, direction=direction, metric=f"r{k}")
            per_k[f"r{k}"] = {
                "matrix": [[None if np.isnan(x) else round(float(x), 4) for x in row] for row in m],
                "average": average(m),
                "forgetting": forgetting(m),
                "forgetting_official": forgetting_official(m),
            }
        mean: dict[str, float | None] = {}
        for name in ("average", "forgetting", "forgetting_official"):
            values = [per_k[f"r{k}"][name] for k in ks]
            mean[name] = None if any(v is None for v in values) else float(np.mean(values))
        out[direction] = {"per_k": per_k, "mean_over_k": mean}
    return out
