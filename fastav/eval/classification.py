"""Classification metrics of any fine-tuned method over a process group: accuracy (single-label) and mAP (multi-label).

:func:`collect` runs ``method.predict(fbank, video)`` (a dict of named class-score tensors: probabilities, one
entry per output such as 'audio', 'video', 'fused') over an evaluation loader on every rank, gathers the valid
rows of all ranks and returns them with the labels. :func:`classification_metrics` scores each output:

- single-label (``method.classify.labels=single``): top-1 accuracy in percent, the target being the arg-max of the
  label row (labels are one-hot at evaluation);
- multi-label (``labels=multi``): mean average precision in percent over the classes that have at least one
  positive, AP as scikit-learn's ``average_precision_score`` (precision at each distinct score threshold, weighted
  by the recall gained there), which is what CAV-MAE reports.

The module's train / eval mode is restored afterwards; every rank must call :func:`collect` with a loader of the
same number of batches (fastav's evaluation loaders pad and flag the padding with ``valid``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastav.eval.retrieval import _gather


def average_precision(scores_N: np.ndarray, targets_N: np.ndarray) -> float:
    """AP of one class: sum over distinct score thresholds (highest first) of (recall gain) x (precision there).

    Tied scores form one threshold, as in scikit-learn. NaN when there is no positive.
    """
    scores_N = np.asarray(scores_N, dtype=np.float64)
    positive_N = np.asarray(targets_N) > 0.5
    total = int(positive_N.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores_N, kind="stable")
    s, pos = scores_N[order], positive_N[order]
    tp, fp = np.cumsum(pos), np.cumsum(~pos)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # the last row of every run of equal scores
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.r_[0, tp]) / total
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores_NC: np.ndarray, targets_NC: np.ndarray) -> tuple[float, int]:
    """(mAP in percent over the classes with a positive, how many classes that is)."""
    aps = [average_precision(scores_NC[:, c], targets_NC[:, c]) for c in range(scores_NC.shape[1])]
    valid = [a for a in aps if not np.isnan(a)]
    return (100.0 * float(np.mean(valid)) if valid else float("nan")), len(valid)


def accuracy(scores_NC: np.ndarray, labels_NC: np.ndarray) -> float:
    """Top-1 accuracy in percent: arg-max of the scores against the arg-max of the label rows."""
    return 100.0 * float(np.mean(scores_NC.argmax(axis=1) == labels_NC.argmax(axis=1)))


@torch.no_grad()
def collect(
    method: nn.Module, batches: Iterable[Mapping[str, Tensor]], *, device: torch.device
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores of every output and the labels of every clip all ranks read: ``({name: (N, C)}, (N, C))``."""
    was_training = method.training
    method.eval()
    parts: dict[str, list[Tensor]] = {}
    labels, valid = [], []
    try:
        for batch in batches:
            scores = method.predict(batch["fbank"].to(device), batch["video"].to(device))
            for name, value in scores.items():
                parts.setdefault(name, []).append(value.float())
            labels.append(batch["labels"].to(device).float())
            valid.append(batch["valid"].to(device).bool().view(-1))
    finally:
        method.train(was_training)
    if not labels:
        raise ValueError("classification: the evaluation loader gave no batch")
    keep = _gather(torch.cat(valid)).cpu().numpy()  # sync-ok: evaluation
    out = {name: _gather(torch.cat(v)).cpu().numpy()[keep] for name, v in parts.items()}  # sync-ok: evaluation
    return out, _gather(torch.cat(labels)).cpu().numpy()[keep]  # sync-ok: evaluation


def classification_metrics(
    scores: Mapping[str, np.ndarray], labels_NC: np.ndarray, *, multilabel: bool
) -> dict[str, Any]:
    """``{output: accuracy or mAP (percent)}`` plus ``metric`` ('accuracy' or 'mAP') and ``n`` (clips)."""
    out: dict[str, Any] = {"metric": "mAP" if multilabel else "accuracy", "n": int(labels_NC.shape[0])}
    if not multilabel:
        positives = (labels_NC > 0.5).sum(axis=1)
        if (positives != 1).any():
            raise ValueError(
                f"{int((positives != 1).sum())} of {labels_NC.shape[0]} evaluation clips do not have exactly one "
                f"label; set method.classify.labels=multi for a multi-label dataset"
            )
    for name, value in scores.items():
        if multilabel:
            out[name], out["classes_scored"] = mean_average_precision(value, labels_NC)
        else:
            out[name] = accuracy(value, labels_NC)
    return out
