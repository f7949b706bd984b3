"""``launch/finetune.py`` end to end in a fresh process: per-epoch scores on both splits, validation selection,
the report and its plots, and a resumed run that repeats the uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import cpu_launch_env

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--recipe", "debug_mla", "data.source=synthetic", "data.synthetic_clips=24", "data.batch_size=4",
    "method.mla.encoders=resnet18", "method.mla.resnet_width=4", "train.epochs=2", "train.log_every=2",
    "eval.batch_size=8",
]  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = cpu_launch_env()
    cmd = [sys.executable, str(ROOT / "launch" / "finetune.py"), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_mla_run_reports_every_epoch_selects_on_validation_and_resumes(tmp_path: Path) -> None:
    full = tmp_path / "full"
    _run([*COMMON, f"train.run_dir={full}"])
    report = json.loads((full / "report.json").read_text())
    assert report["method"] == "mla" and report["metric"] == "accuracy" and report["finished"]
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    for epoch in report["epochs"]:
        for split in ("val", "test"):
            assert {"audio", "video", "fused", "fused_entropy", "fused_fixed"} <= set(epoch[split])
    assert report["epochs"][0]["val"]["n"] == 5 and report["epochs"][0]["test"]["n"] == 24
    best = max(report["epochs"], key=lambda e: e["val"]["fused"])  # the first of equal scores wins
    assert report["selection"]["how"] == "best validation epoch" and report["selection"]["epoch"] == best["epoch"]
    assert report["final"]["val"]["fused"] == best["val"]["fused"]
    assert report["final"]["test"] == best["test"]
    assert (full / "plots" / "scores_val.png").is_file() and (full / "plots" / "scores_test.png").is_file()
    assert "validation split" in (full / "report.md").read_text()
    # resume from the end of epoch 1: epoch 2 is trained again and scores the same
    first = sorted((full / "checkpoints").glob("step_*"))[0]
    resumed = tmp_path / "resumed"
    _run([*COMMON, f"train.run_dir={resumed}", f"train.resume={first}"])
    again = json.loads((resumed / "report.json").read_text())
    assert again["epochs"][-1] == report["epochs"][-1]
