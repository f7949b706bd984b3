"""Classification metrics (accuracy, mAP against hand-computed values) and the synthetic source's fine-tuning
options (weak modality, validation split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastav.config import load_config
from fastav.data import build_loader
from fastav.eval.classification import accuracy, average_precision, classification_metrics, mean_average_precision


def test_map_against_a_hand_computed_case() -> None:
    # class 0: ranking (0.9+, 0.8-, 0.7+, 0.1-): precision 1/1 at the first positive, 2/3 at the second -> 5/6
    # class 1: scores 0.4 (+), 0.4 (-), 0.3 (+), 0.2 (-): the tie at 0.4 is one threshold (precision 1/2 at recall
    #          1/2), then precision 2/3 at recall 1 -> (1/2 + 2/3) / 2 = 7/12
    # class 2: no positive -> left out of the mean
    scores = np.array([[0.9, 0.4, 0.5], [0.8, 0.4, 0.1], [0.7, 0.3, 0.2], [0.1, 0.2, 0.3]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert average_precision(scores[:, 0], targets[:, 0]) == pytest.approx(5 / 6)
    assert average_precision(scores[:, 1], targets[:, 1]) == pytest.approx(7 / 12)
    assert np.isnan(average_precision(scores[:, 2], targets[:, 2]))
    value, scored = mean_average_precision(scores, targets)
    assert scored == 2 and value == pytest.approx(100 * (5 / 6 + 7 / 12) / 2)
    out = classification_metrics({"fused": scores}, targets, multilabel=True)
    assert out["metric"] == "mAP" and out["fused"] == pytest.approx(value) and out["n"] == 4


def test_accuracy_and_single_label_check() -> None:
    labels = np.eye(3)[[0, 1, 2, 2]]
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    assert accuracy(scores, labels) == pytest.approx(75.0)
    out = classification_metrics({"audio": scores, "video": labels}, labels, multilabel=False)
    assert (out["audio"], out["video"], out["metric"]) == (pytest.approx(75.0), 100.0, "accuracy")
    with pytest.raises(ValueError, match="method.classify.labels=multi"):
        classification_metrics({"fused": scores}, labels + np.eye(3)[[1, 0, 0, 0]], multilabel=False)


def test_synthetic_weak_modality_and_validation_split() -> None:
    common = ["data.source=synthetic", "data.synthetic_clips=48", "data.batch_size=4"]
    plain = build_loader(load_config("debug", common), "train")
    weak_cfg = load_config("debug", [*common, "data.synthetic_weak_modality=video", "data.synthetic_noise=0.5"])
    weak = build_loader(weak_cfg, "train")
    changed = 0
    for i in range(48):
        (v0, a0), (v1, a1) = plain.sample(i), weak.sample(i)
        assert torch.equal(a0, a1)  # the strong modality is untouched
        changed += not torch.equal(v0, v1)
    assert 10 <= changed <= 32  # about 0.5 * 7/8 of the clips show another class's video
    split_cfg = load_config("debug", [*common, "data.val_fraction=0.25"])
    train, val = build_loader(split_cfg, "train"), build_loader(split_cfg, "val")
    assert len(val.ids) == 12 and len(train.ids) == 36
    assert set(train.ids.tolist()) | set(val.ids.tolist()) == set(range(48))
    (batch,) = list(val)  # evaluation: one batch of 16 rows, 12 real ones
    assert not val.train and int(batch["valid"].sum()) == 12
    assert set(batch["index"][batch["valid"]].tolist()) == set(val.ids.tolist())
    again = build_loader(load_config("debug", [*common, "data.val_fraction=0.25", "train.seed=7"]), "val")
    assert torch.equal(again.ids, val.ids)  # the held-out clips do not depend on the seed
