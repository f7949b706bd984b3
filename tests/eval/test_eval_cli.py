"""``python -m fastav.eval``: argument errors, retrieval of a random initialisation and of a weights file on synthetic
clips, and compare's error for a directory without a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastav.eval.__main__ import main

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = ["--recipe", "debug", "data.source=synthetic", "data.synthetic_clips=32", "data.synthetic_tasks=2"]


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """(direction, group) -> the other cells of format_retrieval's rows."""
    return {tuple(line.split()[:2]): line.split()[2:] for line in text.splitlines() if line.startswith(("a2v", "v2a"))}


def test_module_without_command_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "fastav.eval"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "the first argument is a command: retrieval or compare" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["evaluate"], ["--weights", "x.safetensors"]])
def test_no_or_unknown_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: the first argument is a command: retrieval or compare" in err
    assert "python -m fastav.eval retrieval --weights" in err  # the usage examples


@pytest.mark.parametrize("argv", [["retrieval"], ["retrieval", "--weights", "w.safetensors", "--init", "random"]])
def test_retrieval_needs_exactly_one_of_weights_and_init(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, *SYNTHETIC]) == 2
    assert "give exactly one of --weights FILE and --init random" in capsys.readouterr().err


def test_retrieval_of_missing_weights_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.pth"
    assert main(["retrieval", "--weights", str(missing), *SYNTHETIC]) == 2
    assert str(missing) in capsys.readouterr().err


def test_retrieval_of_random_init_on_synthetic_clips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["retrieval", "--init", "random", *SYNTHETIC, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model: random initialisation (train.seed 2021)" in text
    assert text.split("\n")[1].split() == ["direction", "group", "n", "R@1", "R@5", "R@10", "MedR"]
    rows = table_rows(text)
    assert set(rows) == {(d, g) for d in ("a2v", "v2a") for g in ("all", "task0", "task1")}
    assert rows[("a2v", "all")][0] == "32" and rows[("a2v", "task0")][0] == "16" and rows[("v2a", "task1")][0] == "16"
    assert "gallery 32 clips; chance R@1 3.1, R@5 15.6, R@10 31.2" in text
    saved = json.loads(out.read_text())
    assert saved["weights"] is None and saved["split"] == "retrieval" and saved["gallery"] == 32
    for direction in ("a2v", "v2a"):
        for name in ("task0", "task1"):
            m = saved[direction]["groups"][name]
            assert rows[(direction, name)] == [str(m["n"]), *[f"{m[f'r{k}']:.1f}" for k in (1, 5, 10)],
                                               f"{m['median_rank']:g}"]  # fmt: skip


def test_retrieval_of_a_weights_file_uses_its_weights_and_config(tmp_path: Path) -> None:
    """A fastav weights file (config stored inside, no --recipe) gives the same figures as evaluating the saved
    model directly."""
    from fastav.config import load_config
    from fastav.data import build_loader, dataset_tasks
    from fastav.eval import evaluate_retrieval
    from fastav.models import build_pretrain_model, save_weights

    cfg = load_config("debug", SYNTHETIC[2:])
    torch.manual_seed(123)  # not train.seed: a model the CLI's own random initialisation would not rebuild
    model = build_pretrain_model(cfg)
    weights = save_weights(model, tmp_path / "weights.safetensors", config=cfg)
    loader = build_loader(cfg, "retrieval", train=False, device=torch.device("cpu"))
    want = evaluate_retrieval(model, loader, device=torch.device("cpu"), ks=cfg.eval.retrieval_ks,
                              group_names=dataset_tasks(cfg, role=None))  # fmt: skip

    out = tmp_path / "w.json"
    assert main(["retrieval", "--weights", str(weights), "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved.pop("weights") == str(weights) and saved.pop("split") == "retrieval"
    assert saved == json.loads(json.dumps(want))


def test_compare_without_report_exits_2_naming_the_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["compare", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no report.json" in err
    assert not (tmp_path / "out" / "comparison.md").exists()
