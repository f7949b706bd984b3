"""Pieces of the fine-tuning run that need no process group: checkpoint weight averaging, best-epoch keeping,
multi-frame prediction, the config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastav.config import ConfigError, load_config
from fastav.finetune import build_method
from fastav.finetune.runner import AVERAGE_FILE, BEST_FILE, Evaluator, check, scored_window_starts
from fastav.models import load_weights
from fastav.models.weights import read_weights_metadata
from fastav.train.engine import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_weight_average_is_the_mean_of_the_epochs_weights_and_best_epoch_is_kept(tmp_path: Path) -> None:
    cfg = load_config("debug_finetune", ["method.classify.average_from=2", "method.classify.average_to=4"])
    evaluator = Evaluator(cfg, CPU, tmp_path)
    holder = _Holder()
    seen = []
    for epoch, score in zip((2, 3, 4), (50.0, 70.0, 60.0), strict=True):
        with torch.no_grad():
            for p in holder.model.parameters():
                p.add_(torch.randn_like(p))
        seen.append({k: v.clone() for k, v in holder.model.state_dict().items()})
        evaluator._fold_into_average(holder, epoch)
        evaluator._keep_if_best(holder, epoch, score)
    evaluator._fold_into_average(holder, 3)  # a resumed run replaying epoch 3 adds nothing
    target = _Holder()
    load_weights(target.model, tmp_path / AVERAGE_FILE)
    for key, value in target.model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, torch.stack([s[key] for s in seen]).mean(dim=0), atol=1e-6), key
        else:
            assert torch.equal(value, seen[-1][key])  # counters: the latest
    assert read_weights_metadata(tmp_path / AVERAGE_FILE)["epochs"] == "[2, 3, 4]"
    best = read_weights_metadata(tmp_path / BEST_FILE)
    assert (best["epoch"], float(best["score"])) == ("3", 70.0)
    load_weights(target.model, tmp_path / BEST_FILE)
    assert all(torch.equal(v, seen[1][k]) for k, v in target.model.state_dict().items())


def test_multi_frame_prediction_averages_the_per_frame_scores() -> None:
    cfg = load_config(
        "debug_finetune",
        ["data.source=synthetic", "data.sampling=cavmae", "data.num_frames=1", "method.name=cavmae_ft"],
    )
    method = build_method(cfg).eval()
    g = torch.Generator().manual_seed(0)
    fbank = torch.randn(2, cfg.data.target_length, cfg.data.num_mel_bins, generator=g)
    video = torch.randn(2, 10, 3, cfg.data.frame_size, cfg.data.frame_size, generator=g)
    scores = method.predict(fbank, video)["fused"]
    per_frame = torch.stack([method.predict(fbank, video[:, t : t + 1])["fused"] for t in range(10)])
    assert torch.allclose(scores, per_frame.mean(dim=0), atol=1e-6)
    assert torch.allclose(scores.sum(dim=1), torch.ones(2), atol=1e-5)


def test_config_checks_of_a_finetuning_run() -> None:
    check(load_config("debug_mla"))
    with pytest.raises(ConfigError, match="method.classify.select: got 'val' with data.val_fraction=0"):
        check(load_config("debug_mla", ["data.val_fraction=0"]))
    check(load_config("debug_mla", ["data.val_fraction=0", "method.classify.select=last"]))
    with pytest.raises(ConfigError, match="accepted for fine-tuning"):
        check(load_config("debug"))
    with pytest.raises(ConfigError, match="multi_frame_eval"):
        check(load_config("debug_finetune", ["method.classify.multi_frame_eval=true"]))
    with pytest.raises(ConfigError, match="test_windows: got 4.*synthetic clips have no time axis"):
        check(load_config("debug_finetune", ["method.classify.test_windows=4", "data.source=synthetic"]))
    with pytest.raises(ConfigError, match="test_windows: got 2.*frame grid"):
        check(load_config("debug_finetune", ["method.classify.test_windows=2", "data.sampling=cavmae",
                                             "data.num_frames=1"]))  # fmt: skip
    with pytest.raises(ConfigError, match="test_windows"):
        load_config("debug_finetune", ["method.classify.test_windows=0"])
    with pytest.raises(ConfigError, match="model.init"):
        build_method(load_config("debug_mla", ["data.source=synthetic", "model.init=x.safetensors"]))


def test_stella_test_windows_score_every_window_as_one_prediction(synth_dataset, tmp_path: Path) -> None:
    root, _, _ = synth_dataset
    cfg = load_config("debug_finetune", [f"data.root={root}", "method.classify.test_windows=4", "eval.batch_size=16"])
    assert load_config("stella_probe_vggsound").method.classify.test_windows == 4
    assert scored_window_starts(cfg) == [0.0, 2.0, 4.0, 6.0]  # 4 frames 1 s apart: a window every 2 s
    method = build_method(cfg).eval()
    windowed = Evaluator(cfg, CPU, tmp_path).scores(method, "test")
    assert windowed["windows"] == [0.0, 2.0, 4.0, 6.0] and windowed["n"] == 4 * 36
    per_window = []
    for start in windowed["windows"]:  # the same as scoring each window on its own, counted once per clip
        one = load_config("debug_finetune", [f"data.root={root}", f"data.eval_window_start={start}"])
        per_window.append(Evaluator(one, CPU, tmp_path).scores(method, "test"))
    assert all(w["n"] == 36 and "windows" not in w for w in per_window)
    assert windowed["fused"] == pytest.approx(sum(w["fused"] for w in per_window) / 4)
    # the windows see different frames (4-s clips: starts 0 and 7 of 32 frames at 8 fps, the later ones clamped)
    ev = Evaluator(cfg, CPU, tmp_path)
    first, last = (next(iter(ev.loader("test", s)))["video"] for s in (0.0, 6.0))
    assert not torch.equal(first, last)
    validation = Evaluator(load_config("debug_finetune", [f"data.root={root}", "method.classify.test_windows=4"]),
                           CPU, tmp_path).scores(method, "val")  # fmt: skip
    assert "windows" not in validation
