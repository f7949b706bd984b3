"""Pre-train an audio-video MAE (MAE + InfoNCE): ``deepspeed [--num_gpus N] launch/pretrain.py --recipe NAME [...]``.

    deepspeed --num_gpus 4 launch/pretrain.py --recipe cavmae_base data.root=/data/as2m
    deepspeed --num_gpus 2 launch/pretrain.py --recipe debug --synthetic 256 train.run_dir=runs/dbg   # CPU works
    python launch/pretrain.py --recipe debug --synthetic 256 train.max_steps=50                       # one process

Data comes from the shards at ``data.root`` (or $FASTAV_DATA) through :func:`fastav.data.build_loader`, or with
``--synthetic N`` from N in-memory synthetic clips (:class:`fastav.train.synthetic.SyntheticAV`). Resume with
``train.resume=auto`` (latest checkpoint of ``train.run_dir``) or ``train.resume=DIR``. On a machine without
CUDA, DeepSpeed runs on its CPU accelerator with gloo.
"""

from __future__ import annotations

import argparse
import sys

from fastav.config import RECIPES, ConfigError, load_config
from fastav.train.engine import DistInfo
from fastav.train.pretrain import Loader, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/pretrain.py", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="train on N synthetic clips")
    parser.add_argument("--classes", type=int, default=8, help="classes of the synthetic clips")
    parser.add_argument("--eval", action="store_true", help="audio-video retrieval after training")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the launcher
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        if not args.synthetic:
            cfg.validate(require_data=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def train_loader(dist: DistInfo) -> Loader:
        if args.synthetic:
            from fastav.train.synthetic import SyntheticAV

            return SyntheticAV(cfg, num_samples=args.synthetic, num_classes=args.classes, **_ranks(dist))
        from fastav.data import build_loader

        return build_loader(cfg, "train", **_ranks(dist))

    def eval_loader(dist: DistInfo) -> Loader:
        if args.synthetic:
            from fastav.train.synthetic import SyntheticAV

            held_out = max(cfg.eval.batch_size * dist.world_size, 64)
            return SyntheticAV(
                cfg, num_samples=held_out, num_classes=args.classes, shuffle=False, offset=args.synthetic,
                batch_size=cfg.eval.batch_size, **_ranks(dist),
            )  # fmt: skip
        from fastav.data import build_loader

        return build_loader(cfg, "retrieval", **_ranks(dist))

    result = pretrain(cfg, train_loader, make_eval_loader=eval_loader if args.eval else None)
    if result.rank == 0:
        last = result.history[-1] if result.history else {}
        print(f"done: step {result.step}, epoch {result.epoch}, loss {last.get('loss')}, run_dir {result.run_dir}")
        if result.retrieval:
            print("retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in result.retrieval.items()))
    return 0


def _ranks(dist: DistInfo) -> dict[str, object]:
    return {"rank": dist.rank, "world_size": dist.world_size, "device": dist.device}


if __name__ == "__main__":
    raise SystemExit(main())
