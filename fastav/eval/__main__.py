"""``python -m fastav.eval``: the retrieval report of any weights, and the side-by-side comparison of runs.

    python -m fastav.eval retrieval --weights runs/demo/er/weights.safetensors data.root=runs/demo/data
    python -m fastav.eval retrieval --init random --recipe debug data.root=runs/demo/data     # untrained baseline
    python -m fastav.eval retrieval --weights audioset_pretrained.pth --recipe stella_vggsound data.root=/data/vgg
    python -m fastav.eval compare runs/demo/finetune runs/demo/er --out runs/demo

``retrieval`` builds the model of the recipe (a fastav weights file carries its own config, used unless
``--recipe`` is given), loads the weights (fastav ``.safetensors``, or an official CAV-MAE / STELLA ``.pth`` in
``model.arch``'s layout) or keeps the random initialisation of ``train.seed``, and measures audio <-> video
retrieval on ``--split`` (every clip of the split is the gallery): R@K for ``eval.retrieval_ks``, median rank,
per task category and overall. ``--json FILE`` also writes the numbers. One process; a GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastav.config import RECIPES, Config, ConfigError, apply_overrides, load_config


def _config(args: argparse.Namespace) -> Config:
    from fastav.models.weights import config_from_weights

    stored = None
    if args.weights and args.weights.endswith(".safetensors") and args.recipe is None:
        stored = config_from_weights(args.weights)
    if stored is not None:
        cfg = apply_overrides(stored, ["train.resume=", "model.init=", *args.overrides])
    else:
        cfg = load_config(args.recipe or "debug", args.overrides)
    return cfg.validate(require_data=cfg.data.source == "shards")


def retrieval(args: argparse.Namespace) -> int:
    from fastav.data import build_loader, dataset_tasks
    from fastav.eval.retrieval import evaluate_retrieval, format_retrieval
    from fastav.models import CheckpointError, build_pretrain_model, load_init
    from fastav.train.engine import seed_everything

    if bool(args.weights) == (args.init == "random"):
        print("error: give exactly one of --weights FILE and --init random", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
        seed_everything(cfg.train.seed)
        model = build_pretrain_model(cfg)
        what = f"random initialisation (train.seed {cfg.train.seed})"
        if args.weights:
            report = load_init(model, args.weights, family=cfg.model.arch)
            what = f"{args.weights} ({report})"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        tasks = dataset_tasks(cfg, role=None)
        loader = build_loader(cfg, args.split, train=False, device=device)
        result = evaluate_retrieval(model, loader, device=device, ks=cfg.eval.retrieval_ks, group_names=tasks)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"retrieval on the {args.split} split of {cfg.data_root() or 'synthetic clips'}; model: {what}")
    print(format_retrieval(result, cfg.eval.retrieval_ks))
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": args.weights, "split": args.split, **result}, indent=1))
    return 0


def compare(args: argparse.Namespace) -> int:
    from fastav.eval.report import compare as compare_runs

    out = Path(args.out or Path(args.runs[0]).parent)
    try:
        table = compare_runs(args.runs, out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.png'}")
    return 0


def _parsers() -> dict[str, argparse.ArgumentParser]:
    r = argparse.ArgumentParser(prog="python -m fastav.eval retrieval", description="audio <-> video retrieval of a "
                                "weights file or of a random initialisation")  # fmt: skip
    r.add_argument("--weights", help="fastav .safetensors or an official CAV-MAE / STELLA checkpoint")
    r.add_argument("--init", choices=["random"], help="measure the untrained model instead")
    r.add_argument("--recipe", choices=sorted(RECIPES), help="model and data settings (default: the weights' own)")
    r.add_argument("--split", default="retrieval", choices=["retrieval", "test", "train"])
    r.add_argument("--json", help="also write the figures to this JSON file")
    r.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.root=DIR")
    c = argparse.ArgumentParser(prog="python -m fastav.eval compare", description="continual runs side by side")
    c.add_argument("runs", nargs="+", help="run directories of continual runs (each with its report.json)")
    c.add_argument("--out", help="where comparison.md / .png go (default: the first run's parent)")
    return {"retrieval": r, "compare": c}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parsers = _parsers()
    if not argv or argv[0] not in parsers:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: the first argument is a command: {' or '.join(parsers)}", file=sys.stderr)
        return 2
    command = argv[0]
    args = parsers[command].parse_intermixed_args(argv[1:])
    return retrieval(args) if command == "retrieval" else compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
