"""Run reports (report.json, report.md, plots) of a fake continual result, and the comparison of two runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastav.config import load_config
from fastav.eval.report import compare, load_report, write_continual_report

TASKS = ["sports", "music", "vehicle"]
PNG = b"\x89PNG\r\n\x1a\n"
# R@1 after task t (rows) on task k's category (columns); R@5 = R@1 + 20; v2a = a2v - 5.
ER_R1 = np.array([[50.0, 10.0, 20.0], [30.0, 60.0, 15.0], [40.0, 45.0, 70.0]])
FT_R1 = np.array([[50.0, 10.0, 20.0], [10.0, 70.0, 15.0], [5.0, 20.0, 80.0]])


def retrieval(r1_row: np.ndarray, shift: float) -> dict:
    def block(d: float) -> dict:
        groups = {t: {"r1": r1_row[k] + d, "r5": r1_row[k] + 20 + d, "median_rank": 4.0 + k, "n": 5}
                  for k, t in enumerate(TASKS)}  # fmt: skip
        overall = {"r1": float(np.mean(r1_row)) + d, "r5": float(np.mean(r1_row)) + 20 + d, "median_rank": 5.5, "n": 15}
        return {"overall": overall, "groups": groups}

    return {"gallery": 15, "a2v": block(0.0), "v2a": block(shift)}


def fake_run(run_dir: Path, method: str, r1: np.ndarray, *, evaluated: bool = True) -> dict:
    run_dir.mkdir(parents=True)
    records = [{"tag": "train", "step": 10 * (i + 1), "clips_per_s": c, "step_time": s, "data_share": 0.1}
               for i, (c, s) in enumerate([(100.0, 0.5), (300.0, 0.2), (200.0, 0.3)])]  # fmt: skip
    records.append({"tag": "eval", "step": 30, "clips_per_s": 1e9})  # not a training window
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stages = []
    for t, name in enumerate(TASKS):
        stage = {"stage": t, "name": name, "step": 10 * (t + 1)}
        if evaluated:
            stage["eval"] = retrieval(r1[t], shift=-5.0)
        stages.append(stage)
    result = SimpleNamespace(stage_results=stages, finished=True, step=30)
    cfg = load_config("debug", [f"method.name={method}", "eval.retrieval_ks=1,5"])
    return write_continual_report(run_dir, cfg, result, TASKS, memory_bytes_per_clip=2_900_000)


def md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of cells (header first, the --- line left out)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if not re.fullmatch(r"\|( --- \|)+", line):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def test_report_json_markdown_and_plots(tmp_path: Path) -> None:
    run_dir = tmp_path / "er"
    returned = fake_run(run_dir, "er", ER_R1)
    report = json.loads((run_dir / "report.json").read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["method"] == "er" and report["recipe"] == "debug" and report["tasks"] == TASKS
    assert report["finished"] is True and report["steps"] == 30
    assert [a["task"] for a in report["after_task"]] == TASKS and [a["step"] for a in report["after_task"]] == [
        10, 20, 30
    ]  # fmt: skip
    assert report["speed"]["clips_per_s"] == 200.0 and report["speed"]["step_time"] == 0.3
    assert report["memory_bytes_per_clip"] == 2_900_000
    assert report["config"]["method"]["name"] == "er"
    s = report["summary"]
    assert s["a2v"]["per_k"]["r1"]["matrix"] == ER_R1.tolist()
    assert s["v2a"]["per_k"]["r5"]["matrix"] == (ER_R1 + 15).tolist()
    assert s["a2v"]["per_k"]["r1"]["average"] == pytest.approx(155 / 3)
    assert s["a2v"]["per_k"]["r1"]["forgetting"] == pytest.approx(12.5)
    assert s["a2v"]["per_k"]["r1"]["forgetting_official"] == pytest.approx(-12.5)
    assert s["v2a"]["mean_over_k"]["average"] == pytest.approx(155 / 3 + 5)

    md = (run_dir / "report.md").read_text()
    assert "# Continual run: er (debug)" in md
    assert "trained 3 of 3; 30 steps" in md
    assert "2.900 MB per clip" in md
    assert "200.0 clips/s" in md and "data wait 10.0 %" in md
    tables = md_tables(md)
    assert len(tables) == 1 + 2 * 2  # summary, then a matrix per direction and K
    summary = tables[0]
    assert summary[0] == ["direction", "metric", "Average", "Forgetting", "Forgetting (official code)"]
    assert ["a2v", "R@1", "51.7", "12.5", "-12.5"] in summary
    expected = []
    for direction in ("a2v", "v2a"):
        block = s[direction]
        for key in ("r1", "r5"):
            f = block["per_k"][key]
            expected.append([direction, f"R@{key[1:]}", fmt(f["average"]), fmt(f["forgetting"]),
                             fmt(f["forgetting_official"])])  # fmt: skip
        m = block["mean_over_k"]
        expected.append([direction, "mean", fmt(m["average"]), fmt(m["forgetting"]), fmt(m["forgetting_official"])])
    assert summary[1:] == expected
    headings = re.findall(r"^## (.*)$", md, flags=re.M)
    assert headings[1:] == [
        f"{label}, R@{k} after each task (rows) on each task's category (columns)"
        for label in ("audio -> video", "video -> audio")
        for k in (1, 5)
    ]
    for table, (direction, key) in zip(tables[1:], [("a2v", "r1"), ("a2v", "r5"), ("v2a", "r1"), ("v2a", "r5")],
                                       strict=True):  # fmt: skip
        assert table[0] == ["after \\ on", *TASKS]
        matrix = s[direction]["per_k"][key]["matrix"]
        assert table[1:] == [[TASKS[t], *[fmt(x) for x in row]] for t, row in enumerate(matrix)]
    assert "Gallery: 15 clips (chance: R@1 6.67, R@5 33.33)" in md
    assert "Median rank after the last task: a2v 5.5, v2a 5.5." in md  # as in report.json, not rounded to 6

    plots = run_dir / "plots"
    names = {"matrix_a2v_r1.png", "matrix_a2v_r5.png", "matrix_v2a_r1.png", "matrix_v2a_r5.png", "r1_over_tasks.png"}
    assert {p.name for p in plots.iterdir()} == names
    import matplotlib.image

    for name in names:
        assert (plots / name).read_bytes()[:8] == PNG, name
        image = matplotlib.image.imread(plots / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100, name


def test_report_without_evaluation(tmp_path: Path) -> None:
    run_dir = tmp_path / "noeval"
    report = fake_run(run_dir, "finetune", FT_R1, evaluated=False)
    assert report["summary"] is None and report["after_task"] == []
    assert "No evaluation was run" in (run_dir / "report.md").read_text()
    assert not (run_dir / "plots").exists()


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """compare() reads report.json only: skip the run plots (seconds each on a shared CPU)."""
    monkeypatch.setattr("fastav.eval.report.plot_report", lambda report, out_dir: [])


def test_compare_two_runs(tmp_path: Path, no_plots: None) -> None:
    er, ft = fake_run(tmp_path / "er", "er", ER_R1), fake_run(tmp_path / "ft", "finetune", FT_R1)
    out = tmp_path / "cmp"
    table = compare([tmp_path / "er", tmp_path / "ft"], out)
    md = (out / "comparison.md").read_text()
    assert table in md
    rows = md_tables(md)[0]
    assert rows[0][0] == "run" and len(rows[0]) == 10
    by_run = {row[0]: row[1:] for row in rows[1:]}
    assert set(by_run) == {"er", "finetune"}
    for label, rep in (("er", er), ("finetune", ft)):
        want = []
        for direction in ("a2v", "v2a"):
            r1, mean = rep["summary"][direction]["per_k"]["r1"], rep["summary"][direction]["mean_over_k"]
            want += [fmt(r1["average"]), fmt(r1["forgetting"]), fmt(mean["average"]), fmt(mean["forgetting"])]
        assert by_run[label] == [*want, "200.0"]
    # by hand: finetune a2v R@1 Average (5 + 20 + 80) / 3 = 35.0, Forgetting ((50 - 5) + (70 - 20)) / 2 = 47.5
    assert by_run["finetune"][:2] == ["35.0", "47.5"]
    assert by_run["er"][:2] == ["51.7", "12.5"]
    assert (out / "comparison.png").read_bytes()[:8] == PNG


def test_compare_labels_runs_of_one_method_by_directory_and_shows_unevaluated_runs(
    tmp_path: Path, no_plots: None
) -> None:
    fake_run(tmp_path / "a", "er", ER_R1)
    fake_run(tmp_path / "b", "er", FT_R1, evaluated=False)
    compare([tmp_path / "a", tmp_path / "b"], tmp_path)
    rows = md_tables((tmp_path / "comparison.md").read_text())[0]
    assert [r[0] for r in rows[1:]] == ["er (a)", "er (b)"]
    assert rows[2][1:] == ["-"] * 9
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG


def test_load_report_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_report(tmp_path)


def test_table_figures_never_read_minus_zero() -> None:
    from fastav.eval.report import _num

    assert [_num(x) for x in (-0.04, -0.0, 0.04, -0.06, None)] == ["0.0", "0.0", "0.0", "-0.1", "-"]
    assert _num(-0.004, digits=2) == "0.00" and _num(12.345, digits=2) == "12.35"
