"""``shards`` is the bottom layer: it runs without importing ``fastav`` (nor torch), with its own progress bars,
its own builder version and its fault-injection hooks kept out of a normal build."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from media_cases import CLIP_ARGS

from shards import _testing
from shards.manifest import builder_version
from shards.progress import progress

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
from shards.__main__ import main

root = sys.argv[1]
build = ["build", "--input", root + "/videos", "--out", root + "/built", "--workers", "0", "--shard-size", "2",
         "--retrieval-per-class", "1", *sys.argv[2:]]
synth = ["synth", "--out", root + "/synth", "--categories", "1", "--classes-per-category", "2",
         "--pretrain-classes-per-category", "1", "--clips-per-class", "2", "--test-fraction", "0.5",
         "--retrieval-per-class", "1", "--size", "16", "--duration", "1", "--workers", "1"]
verify = ["verify", root + "/built", "--workers", "0"]
codes = [main(build), main(synth), main(verify)]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("fastav", "torch", "nvidia"))
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_build_synth_and_verify_import_nothing_from_fastav(media: dict[str, Path], tmp_path: Path) -> None:
    for i, name in enumerate(("h264_aac.mp4", "vp9_opus.webm", "portrait.mp4", "vfr.mp4")):
        target = tmp_path / "videos" / ("alpha" if i % 2 else "beta") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(media[name], target)
    env = {k: v for k, v in os.environ.items() if k != "FASTAV_NO_PROGRESS"}  # draw the bars: they run here too
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), *CLIP_ARGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0], proc.stdout + proc.stderr
    assert result["loaded"] == [], f"shards imported {result['loaded']}"
    assert "synth clips" in proc.stderr and "verify shards" in proc.stderr  # shards' own progress bars were drawn
    for name in ("built", "synth"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["builder_version"] == importlib.metadata.version("fastav") == builder_version()


def test_progress_is_plain_iteration_when_off_or_without_tqdm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FASTAV_NO_PROGRESS", raising=False)
    assert list(progress(range(3), total=3, desc="counting")) == [0, 1, 2]
    assert "counting" in capsys.readouterr().err
    monkeypatch.setenv("FASTAV_NO_PROGRESS", "1")
    assert list(progress(range(3), total=3, desc="counting")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("FASTAV_NO_PROGRESS")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now raises ImportError
    assert list(progress(iter([4, 5]), desc="counting")) == [4, 5]
    assert capsys.readouterr().err == ""


class _Job:
    def __init__(self, source: str) -> None:
        self.source = source


def test_fault_hooks_leave_the_clip_function_alone_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    def work(job: _Job) -> str:
        return f"done {job.source}"

    monkeypatch.delenv(_testing.CRASH_ENV, raising=False)
    monkeypatch.delenv(_testing.HANG_ENV, raising=False)
    assert _testing.with_faults(work) is work
    monkeypatch.setenv(_testing.CRASH_ENV, "c05_")
    faulty = _testing.with_faults(work)
    assert faulty is not work and faulty(_Job("alpha/c01_x.mp4")) == "done alpha/c01_x.mp4"
