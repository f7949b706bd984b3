"""Logging helpers: JSONL metrics (tensors read back), console lines, TensorBoard, rate-limited warnings."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fastav.log import MetricLogger, RateLimited, get_logger, progress, read_metrics


def test_metric_logger_writes_jsonl_and_console(tmp_path, caplog) -> None:
    logger = get_logger("fastav.test")
    logger.propagate = True  # let caplog see it
    with caplog.at_level(logging.INFO, logger="fastav.test"):
        with MetricLogger(tmp_path, logger=logger) as metrics:
            metrics.log(1, {"loss": torch.tensor(0.25), "lr": 1e-4, "clips_per_s": 12})
            metrics.log(2, {"r_at_1": 0.5, "vec": torch.tensor([1.0, 2.0])}, tag="eval")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["tag"] for r in records] == ["train", "eval"]
    assert records[0]["loss"] == 0.25 and records[0]["clips_per_s"] == 12 and records[0]["step"] == 1
    assert records[1]["vec"] == [1.0, 2.0]
    assert read_metrics(tmp_path / "metrics.jsonl", tag="eval")[0]["r_at_1"] == 0.5
    assert "train step 1 | loss 0.25  lr 0.0001  clips_per_s 12" in caplog.text


def test_metric_logger_appends_on_resume(tmp_path) -> None:
    for step in (1, 2):
        with MetricLogger(tmp_path, console=False) as metrics:
            metrics.log(step, {"loss": float(step)})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_tensorboard_event_file(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    with MetricLogger(tmp_path, tensorboard=True, console=False) as metrics:
        metrics.log(3, {"loss": 1.5, "bad": math.nan})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_rate_limited_counts_everything_logs_once_per_interval(caplog) -> None:
    logger = get_logger("fastav.rl")
    logger.propagate = True
    limited = RateLimited(logger, "skipped sample", interval=3600)
    with caplog.at_level(logging.WARNING, logger="fastav.rl"):
        results = [limited(f"key {i}") for i in range(5)]
    assert results == [True, False, False, False, False]
    assert limited.count == 5
    assert caplog.text.count("skipped sample") == 1 and "key 0" in caplog.text


def test_progress_yields_everything(monkeypatch) -> None:
    monkeypatch.setenv("FASTAV_NO_PROGRESS", "0")
    assert list(progress(range(4), desc="x")) == [0, 1, 2, 3]
