"""Continual audio-video pre-training: ``deepspeed [--num_gpus N] launch/continual.py --recipe NAME [...]``.

    deepspeed --num_gpus 4 launch/continual.py --recipe stella_vggsound data.root=/data/vgg-stella \\
        model.init=/ckpt/audioset_pretrained.pth method.name=derpp
    deepspeed --num_gpus 2 launch/continual.py --recipe debug data.root=runs/demo/data method.name=er \\
        model.init=runs/demo/pretrain/weights.safetensors train.run_dir=runs/demo/er      # CPU works
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 launch/continual.py ...          # several nodes

The tasks of the dataset (``continual.task_order`` or the manifest's order), ``continual.epochs_per_task``
epochs each, with the method ``method.name`` (finetune, multitask, er, derpp, lump, stella, stella_plus; STELLA's
AVM comes from ``launch/avm.py`` through ``method.stella.avm_init``); retrieval on the whole
retrieval set after every task, a checkpoint at every task end (kept), and at the end ``report.json``,
``report.md`` and plots in ``train.run_dir``. Resume with ``train.resume=auto``.
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
    _, cfg = parse("launch/continual.py", __doc__.split("\n")[0], argv)
    from fastav.continual import continual

    try:
        result = continual(cfg)
    except (ConfigError, CheckpointError, ResumeError, TrainingError, ValueError) as err:
        return fail(err)
    if result.rank == 0:
        print(
            f"done: {describe(cfg)}; {len(result.stage_results)} task(s), step {result.step}, run_dir {result.run_dir}"
        )
        report = result.run_dir / "report.md"
        if report.is_file():
            print(report.read_text())
            print(f"report: {report}, {result.run_dir / 'report.json'}, plots in {result.run_dir / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
