"""Run reports: ``report.json`` (every figure), ``report.md`` (the matrices and the summary table) and PNG plots,
and the side-by-side comparison of several runs.

A continual run's report holds, for each direction (a2v, v2a) and K of ``eval.retrieval_ks``, the accuracy matrix
``a[t, k]`` (R@K in percent on task k's category after task t), Average, Forgetting (standard) and Forgetting as
STELLA's scripts compute it (labelled "official code"), their means over the Ks, the retrieval after each task
(with median ranks and chance levels), the training speed from ``metrics.jsonl``, the replay memory's bytes per
clip, the resolved config, the git commit and the machine.

Plots: ``plots/matrix_<direction>_r<K>.png`` (heat map of each matrix) and ``plots/r1_over_tasks.png`` (R@1 of
each category after each task, one panel per direction). ``compare`` writes ``comparison.md`` and
``comparison.png`` (Average and Forgetting of R@1 per method and direction).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastav.config import Config
from fastav.eval.continual import continual_summary
from fastav.log import read_metrics

DIRECTIONS = {"a2v": "audio -> video", "v2a": "video -> audio"}


def git_sha(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the fastav checkout (``-dirty`` when it has uncommitted changes), None outside git."""
    here = Path(cwd or Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpus"] = torch.cuda.device_count()
    return info


def speed(run_dir: Path) -> dict[str, float]:
    """Median clips/s, step time and data-wait share over the logged training windows."""
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path, tag="train") if path.is_file() else []
    out: dict[str, float] = {}
    for key in ("clips_per_s", "step_time", "data_share", "peak_mem_gb"):
        values = [r[key] for r in records if isinstance(r.get(key), int | float)]
        if values:
            out[key] = float(np.median(values))
    return out


def write_continual_report(
    run_dir: str | os.PathLike,
    cfg: Config,
    result: Any,
    tasks: Sequence[str],
    *,
    memory_bytes_per_clip: int | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md and the plots of a continual run; returns the report."""
    run_dir = Path(run_dir)
    stages = [r for r in result.stage_results if "eval" in r]
    evals = [r["eval"] for r in stages]
    ks = list(cfg.eval.retrieval_ks)
    report = {
        "method": cfg.method.name,
        "recipe": cfg.recipe,
        "tasks": list(tasks),
        "finished": bool(result.finished),
        "steps": int(result.step),
        "after_task": [{"task": r["name"], "step": r["step"], "retrieval": r["eval"]} for r in stages],
        "summary": continual_summary(evals, tasks, ks) if evals else None,
        "speed": speed(run_dir),
        "memory_bytes_per_clip": memory_bytes_per_clip,
        "git": git_sha(),
        "machine": machine(),
        "config": cfg.to_dict(),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (run_dir / "report.md").write_text(report_markdown(report) + "\n")
    if report["summary"] is not None:
        plot_report(report, run_dir / "plots")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 1) -> str:
    """A figure as printed in the tables: "-" for none, and no "-0.0" for a value that rounds to zero."""
    if x is None:
        return "-"
    text = f"{x:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def summary_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per direction and K (plus the mean over K): Average, Forgetting, Forgetting (official code)."""
    rows = []
    summary = report["summary"]
    for direction in DIRECTIONS:
        block = summary[direction]
        for key, figures in block["per_k"].items():
            rows.append([direction, f"R@{key[1:]}", _num(figures["average"]), _num(figures["forgetting"]),
                         _num(figures["forgetting_official"])])  # fmt: skip
        mean = block["mean_over_k"]
        rows.append([direction, "mean", _num(mean["average"]), _num(mean["forgetting"]),
                     _num(mean["forgetting_official"])])  # fmt: skip
    return rows


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    parts = [f"# Continual run: {report['method']} ({report['recipe']})", ""]
    tasks = report["tasks"]
    parts.append(f"Tasks in order: {', '.join(tasks)}; trained {len(report['after_task'])} of {len(tasks)}; "
                 f"{report['steps']} steps.")  # fmt: skip
    if report.get("memory_bytes_per_clip"):
        parts.append(f"Replay memory: {report['memory_bytes_per_clip'] / 1e6:.3f} MB per clip.")
    sp = report.get("speed") or {}
    if sp:
        parts.append(
            f"Training speed (median over logging windows): {_num(sp.get('clips_per_s'))} clips/s, step "
            f"{_num(sp.get('step_time'), 3)} s, data wait {_num(100 * sp.get('data_share', 0))} % of the time."
        )
    if report["summary"] is None:
        parts.append("\nNo evaluation was run (eval.after_each_task=false).")
        return "\n".join(parts)
    parts += ["", "## Summary (percent)", "",
              "Forgetting: mean over the earlier tasks of (best earlier R@K - final R@K). Forgetting (official "
              "code): STELLA's scripts, which also count the last task and divide by T-1.", ""]  # fmt: skip
    parts.append(_table(["direction", "metric", "Average", "Forgetting", "Forgetting (official code)"],
                        summary_rows(report)))  # fmt: skip
    after = report["after_task"]
    for direction, label in DIRECTIONS.items():
        for key, figures in report["summary"][direction]["per_k"].items():
            parts += ["", f"## {label}, R@{key[1:]} after each task (rows) on each task's category (columns)", ""]
            rows = [[after[t]["task"], *[_num(x) for x in row]] for t, row in enumerate(figures["matrix"])]
            parts.append(_table(["after \\ on", *tasks], rows))
    last = after[-1]["retrieval"] if after else None
    if last is not None:
        n = last["gallery"]
        ks = report["summary"]["ks"]
        chance = ", ".join(f"R@{k} {100.0 * min(k, n) / n:.2f}" for k in ks)
        parts += ["", f"Gallery: {n} clips (chance: {chance}). Median rank after the last task: "
                  f"a2v {last['a2v']['overall']['median_rank']:g}, "
                  f"v2a {last['v2a']['overall']['median_rank']:g}."]  # fmt: skip
    parts += ["", f"git {report.get('git')}; machine {report['machine'].get('host')} "
              f"({report['machine'].get('gpu', 'no GPU')}, {report['machine'].get('cpus')} CPUs)."]  # fmt: skip
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Heat maps of every matrix and the R@1-over-tasks lines; returns the files written."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = report["tasks"]
    after = [a["task"] for a in report["after_task"]]
    written = []
    for direction, label in DIRECTIONS.items():
        for key, figures in report["summary"][direction]["per_k"].items():
            m = np.array([[np.nan if x is None else x for x in row] for row in figures["matrix"]], dtype=float)
            fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(tasks), 1.2 + 0.6 * len(after)))
            im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(np.nanmax(m), 1e-6), aspect="auto")
            for (i, j), x in np.ndenumerate(m):
                if np.isfinite(x):
                    ax.text(j, i, f"{x:.1f}", ha="center", va="center", color="w" if x < np.nanmax(m) / 2 else "k")
            ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
            ax.set_yticks(range(len(after)), [f"after {t}" for t in after])
            ax.set_title(f"{report['method']}: {label} R@{key[1:]} (%)")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            path = out_dir / f"matrix_{direction}_{key}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (direction, label) in zip(axes, DIRECTIONS.items(), strict=True):
        m = report["summary"][direction]["per_k"].get("r1")
        if m is None:
            continue
        m = np.array([[np.nan if x is None else x for x in row] for row in m["matrix"]], dtype=float)
        for k, name in enumerate(tasks):
            ax.plot(range(1, len(after) + 1), m[:, k], marker="o", label=name)
        ax.set_xticks(range(1, len(after) + 1), after, rotation=30, ha="right")
        ax.set_xlabel("after task")
        ax.set_title(f"{label}: R@1 per task category")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R@1 (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(report["method"])
    fig.tight_layout()
    path = out_dir / "r1_over_tasks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Comparison of runs
# ---------------------------------------------------------------------------------------------------------------------


def load_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no report.json (is it the run_dir of a finished continual run?)")
    return json.loads(path.read_text())


def comparison_rows(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[list[str]]:
    rows = []
    for label, rep in zip(labels, reports, strict=True):
        s = rep.get("summary")
        if s is None:
            rows.append([label, *["-"] * 9])
            continue
        row = [label]
        for direction in DIRECTIONS:
            r1 = s[direction]["per_k"].get("r1", {})
            mean = s[direction]["mean_over_k"]
            row += [
                _num(r1.get("average")),
                _num(r1.get("forgetting")),
                _num(mean["average"]),
                _num(mean["forgetting"]),
            ]
        row.append(_num((rep.get("speed") or {}).get("clips_per_s")))
        rows.append(row)
    return rows


COMPARISON_HEAD = [
    "run", "a2v R@1 Avg", "a2v R@1 Fgt", "a2v mean Avg", "a2v mean Fgt",
    "v2a R@1 Avg", "v2a R@1 Fgt", "v2a mean Avg", "v2a mean Fgt", "clips/s",
]  # fmt: skip


def compare(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> str:
    """The comparison table of several runs (printed form returned); writes comparison.md and comparison.png."""
    reports = [load_report(d) for d in run_dirs]
    labels = _labels(run_dirs, reports)
    table = _table(COMPARISON_HEAD, comparison_rows(reports, labels))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = ("Avg: Average R@K (%) over all task categories after the last task; Fgt: Forgetting (standard "
            "definition); mean: averaged over R@1, R@5, R@10.")  # fmt: skip
    (out / "comparison.md").write_text(f"# Comparison\n\n{table}\n\n{note}\n")
    _plot_comparison(reports, labels, out / "comparison.png")
    return table


def _labels(run_dirs: Sequence[str | os.PathLike], reports: Sequence[Mapping[str, Any]]) -> list[str]:
    methods = [r["method"] for r in reports]
    if len(set(methods)) == len(methods):
        return methods
    return [f"{m} ({Path(d).name})" for m, d in zip(methods, run_dirs, strict=True)]


def _plot_comparison(reports: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.3 * len(reports), 4))
    x = np.arange(len(reports))
    for ax, what in zip(axes, ("average", "forgetting"), strict=True):
        for i, direction in enumerate(DIRECTIONS):
            values = []
            for rep in reports:
                s = rep.get("summary")
                v = None if s is None else s[direction]["per_k"].get("r1", {}).get(what)
                values.append(np.nan if v is None else v)
            ax.bar(x + (i - 0.5) * 0.38, values, width=0.38, label=direction)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_title(f"R@1 {what} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
