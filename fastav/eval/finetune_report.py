"""Fine-tuning reports: ``report.json`` (every figure), ``report.md`` (the tables) and one PNG plot per split.

A fine-tuning run's report holds the score (accuracy or mAP, in percent) of every output of the method ('audio',
'video', 'fused', and for MLA 'fused_entropy' / 'fused_fixed') on the validation and the test split after each
epoch, which weights were finally tested and how they were chosen (never on the test split), their scores, the
training speed from ``metrics.jsonl``, the data and initialisation, the resolved config, the git commit and the
machine.

Plots: ``plots/scores_<split>.png``, the score of each output over the epochs, titled with the split it comes
from; the selected epoch is marked on the validation plot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastav.config import Config
from fastav.eval.report import _num, _pyplot, _table, git_sha, machine, speed

SPLIT_NAMES = {"val": "validation split (held out of train)", "test": "test split"}
NOT_OUTPUTS = ("metric", "n", "classes_scored", "windows")


ORDER = ("audio", "video", "fused", "fused_entropy", "fused_fixed")


def _split_name(split: str, scores: Mapping[str, Any]) -> str:
    """The split's name in the report, with the test windows when there are several."""
    name = SPLIT_NAMES.get(split, split)
    windows = scores.get("windows") or []
    if len(windows) > 1:
        starts = ", ".join(f"{w:g}" for w in windows)
        name += f", {len(windows)} windows per clip starting at {starts} s, each scored as one prediction"
    return name


def _clips(scores: Mapping[str, Any]) -> int:
    """Clips scored (``n`` counts predictions: one per clip and window)."""
    return int(scores["n"]) // max(len(scores.get("windows") or []), 1)


def outputs_of(scores: Mapping[str, Any]) -> list[str]:
    """The output names of one split's scores: audio, video, fused, then the others."""
    names = [k for k in scores if k not in NOT_OUTPUTS]
    return sorted(names, key=lambda k: (ORDER.index(k) if k in ORDER else len(ORDER), k))


def data_summary(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    out: dict[str, Any] = {"source": d.source, "val_fraction": d.val_fraction}
    if d.source == "synthetic":
        out.update(clips=d.synthetic_clips, classes=d.synthetic_classes, weak_modality=d.synthetic_weak_modality,
                   noise=d.synthetic_noise)  # fmt: skip
    else:
        out["root"] = cfg.data_root()
    return out


def write_finetune_report(run_dir: str | os.PathLike, cfg: Config, result: Any) -> Path:
    """Write report.json, report.md and the plots of a fine-tuning run; returns the path of report.md."""
    run_dir = Path(run_dir)
    final = result.final
    metric = next(iter(final.values()))["metric"] if final else "accuracy"
    report = {
        "method": cfg.method.name,
        "recipe": cfg.recipe,
        "metric": metric,
        "init": cfg.model.init or None,
        "encoders": cfg.method.mla.encoders if cfg.method.name in ("mla", "concat", "ogm_ge", "qmf") else "backbone",
        "data": data_summary(cfg),
        "finished": bool(result.run.finished),
        "steps": int(result.run.step),
        "epochs": result.epochs,
        "selection": result.selection,
        "final": final,
        "speed": speed(run_dir),
        "git": git_sha(),
        "machine": machine(),
        "config": cfg.to_dict(),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = run_dir / "report.md"
    md.write_text(report_markdown(report) + "\n")
    if report["epochs"]:
        plot_scores(report, run_dir / "plots")
    return md


def _selected_text(selection: Mapping[str, Any]) -> str:
    how = selection.get("how", "-")
    if "epoch" in selection:
        score = _num(selection.get("val_score"))
        return f"{how} (epoch {selection['epoch']}, validation {score} on '{selection['output']}')"
    if "epochs" in selection:
        return f"{how} of epochs {', '.join(map(str, selection['epochs']))}"
    return how + (f" ({selection['note']})" if selection.get("note") else "")


def report_markdown(report: Mapping[str, Any]) -> str:
    metric = report["metric"]
    data = report["data"]
    parts = [f"# Fine-tuning run: {report['method']} ({report['recipe']})", ""]
    init = report["init"] or "random initialisation"
    source = data.get("root") or (
        f"synthetic, {data['clips']} training clips, {data['classes']} classes, weak modality "
        f"{data['weak_modality']} (noise {data['noise']})"
    )
    parts.append(f"Data: {source}; validation fraction {data['val_fraction']}. Encoders: {report['encoders']}; "
                 f"initialisation: {init}. {report['steps']} steps; finished: {report['finished']}.")  # fmt: skip
    sp = report.get("speed") or {}
    if sp:
        parts.append(f"Training speed (median over logging windows): {_num(sp.get('clips_per_s'))} clips/s, step "
                     f"{_num(sp.get('step_time'), 3)} s.")  # fmt: skip
    final = report["final"]
    if final:
        outputs = outputs_of(next(iter(final.values())))
        parts += [
            "",
            f"## Selected weights ({metric}, percent)",
            "",
            f"Tested: {_selected_text(report['selection'])}.",
            "",
        ]
        rows = [[_split_name(s, v), str(_clips(v)), *[_num(v.get(o)) for o in outputs]] for s, v in final.items()]
        parts.append(_table(["split", "clips", *outputs], rows))
    for split in ("val", "test"):
        epochs = [e for e in report["epochs"] if split in e]
        if not epochs:
            continue
        outputs = outputs_of(epochs[0][split])
        parts += ["", f"## {metric} after each epoch, {_split_name(split, epochs[0][split])}", ""]
        rows = [[str(e["epoch"]), *[_num(e[split].get(o)) for o in outputs]] for e in epochs]
        parts.append(_table(["epoch", *outputs], rows))
    if any("test" in e for e in report["epochs"]):
        parts += ["", "Test scores after each epoch are shown for the curves only; the validation split chose the "
                  "tested weights."]  # fmt: skip
    parts += ["", f"git {report.get('git')}; machine {report['machine'].get('host')} "
              f"({report['machine'].get('gpu', 'no GPU')}, {report['machine'].get('cpus')} CPUs)."]  # fmt: skip
    return "\n".join(parts)


def plot_scores(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """One figure per split: each output's score over the epochs."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    chosen = report["selection"].get("epoch")
    for split in ("val", "test"):
        epochs: Sequence[Mapping[str, Any]] = [e for e in report["epochs"] if split in e]
        if not epochs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        x = [e["epoch"] for e in epochs]
        for name in outputs_of(epochs[0][split]):
            style = {"lw": 2.4, "zorder": 3} if name == "fused" else {"lw": 1.4, "ls": "--" if "fused" in name else "-"}
            ax.plot(x, [e[split].get(name) for e in epochs], marker="o", label=name, **style)
        if split == "val" and chosen is not None:
            ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"selected (epoch {chosen})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{report['metric']} (%)")
        windows = len(epochs[0][split].get("windows") or [])
        where = SPLIT_NAMES[split] + (f", {windows} windows per clip" if windows > 1 else "")
        ax.set_title(f"{report['method']}: {report['metric']} per epoch on the {where}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"scores_{split}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
