"""Measuring: zero-shot retrieval of any module over the process group, the continual metrics (accuracy
matrices, Average, Forgetting), run reports with plots, and ``python -m fastav.eval`` (retrieval of any weights,
comparison of runs)."""

from fastav.eval.continual import accuracy_matrix, average, continual_summary, forgetting, forgetting_official
from fastav.eval.retrieval import (
    DIRECTIONS,
    Embeddings,
    embed,
    evaluate_retrieval,
    format_retrieval,
    ranks_of_pairs,
    retrieval_metrics,
    summarize,
)

__all__ = [
    "DIRECTIONS",
    "Embeddings",
    "accuracy_matrix",
    "average",
    "continual_summary",
    "embed",
    "evaluate_retrieval",
    "forgetting",
    "forgetting_official",
    "format_retrieval",
    "ranks_of_pairs",
    "retrieval_metrics",
    "summarize",
]
