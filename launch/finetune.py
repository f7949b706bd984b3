"""Downstream fine-tuning: ``deepspeed [--num_gpus N] launch/finetune.py --recipe NAME [...]``.

    deepspeed --num_gpus 4 launch/finetune.py --recipe stella_probe_vggsound data.root=/data/vgg-stella \\
        model.init=runs/stella/weights.safetensors                         # STELLA's frozen-backbone MLP head
    deepspeed --num_gpus 4 launch/finetune.py --recipe cavmae_ft_vggsound data.root=/data/vgg model.init=/ckpt/cav.pth
    deepspeed --num_gpus 4 launch/finetune.py --recipe mla_cremad data.root=/data/cremad method.name=ogm_ge
    python launch/finetune.py --recipe debug_mla data.source=synthetic method.name=qmf    # CPU works

``method.name`` picks the method: linear_probe, stella_probe, cavmae_ft (classification of any fastav or official
checkpoint given as model.init), or mla and its baselines concat ("normal"), ogm_ge, qmf. Every epoch is scored
on the validation split (data.val_fraction of the training split) and the test split; the weights chosen on the
validation split (or averaged) are tested at the end. ``report.json``, ``report.md`` and plots go to
``train.run_dir``. Resume with ``train.resume=auto``.
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
    _, cfg = parse("launch/finetune.py", __doc__.split("\n")[0], argv)
    from fastav.finetune import finetune

    try:
        result = finetune(cfg)
    except (ConfigError, CheckpointError, ResumeError, TrainingError, ValueError) as err:
        return fail(err)
    if result.run.rank == 0:
        run = result.run
        print(f"done: {describe(cfg)}; {len(result.epochs)} epoch(s), step {run.step}, run_dir {run.run_dir}")
        if result.report is not None:
            print(result.report.read_text())
            print(f"report: {result.report}, {run.run_dir / 'report.json'}, plots in {run.run_dir / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
