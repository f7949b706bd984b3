"""Pre-train an audio-video MAE (MAE + InfoNCE): ``deepspeed [--num_gpus N] launch/pretrain.py --recipe NAME [...]``.

    deepspeed --num_gpus 4 launch/pretrain.py --recipe cavmae_base data.root=/data/as2m
    deepspeed --num_gpus 2 launch/pretrain.py --recipe debug data.root=runs/demo/data train.run_dir=runs/pre
    python launch/pretrain.py --recipe debug data.source=synthetic train.max_steps=50           # one process

One stage of ``train.epochs`` epochs over the dataset's pre-training task (``python -m shards synth
--pretrain-classes-per-category K`` makes one) or, without one, every task. ``--eval`` reports audio-video
retrieval at the end. Resume with ``train.resume=auto`` (latest checkpoint of ``train.run_dir``) or
``train.resume=DIR``. On a machine without CUDA, DeepSpeed runs on its CPU accelerator with gloo.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe, fail, parse  # noqa: E402

from fastav.config import ConfigError  # noqa: E402
from fastav.models import CheckpointError  # noqa: E402
from fastav.train import TrainingError  # noqa: E402
from fastav.train.engine import CheckpointError as ResumeError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(
        "launch/pretrain.py",
        __doc__.split("\n")[0],
        argv,
        lambda p: p.add_argument("--eval", action="store_true", help="audio-video retrieval after training"),
    )
    from fastav.continual import pretrain
    from fastav.eval import format_retrieval

    try:
        result = pretrain(cfg, evaluate=args.eval)
    except (ConfigError, CheckpointError, ResumeError, TrainingError) as err:
        return fail(err)
    if result.rank == 0:
        last = result.history[-1] if result.history else {}
        print(f"done: {describe(cfg)}; step {result.step}, loss {last.get('loss')}, run_dir {result.run_dir}")
        if result.stage_results and "eval" in result.stage_results[-1]:
            print(format_retrieval(result.stage_results[-1]["eval"], cfg.eval.retrieval_ks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
