"""STELLA's AVM stage: ``deepspeed [--num_gpus N] launch/avm.py --recipe NAME [...]``.

    deepspeed --num_gpus 4 launch/avm.py --recipe stella_vggsound data.root=/data/as20k \\
        model.init=/ckpt/audioset_pretrained.pth train.run_dir=runs/avm
    deepspeed --num_gpus 2 launch/avm.py --recipe debug data.root=runs/demo/data \\
        model.init=runs/demo/pretrain/weights.safetensors train.run_dir=runs/demo/avm      # CPU works

Trains the audio-video matching module (L_AVM, half the pairs deranged) for ``method.stella.avm_epochs`` epochs
on the dataset's pre-training task with the backbone of ``model.init`` frozen, and writes
``train.run_dir/avm.safetensors``; a STELLA run starts from it with
``method.stella.avm_init=RUN/avm.safetensors``. Resume with ``train.resume=auto``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fail, parse  # noqa: E402

from fastav.config import ConfigError  # noqa: E402
from fastav.models import CheckpointError  # noqa: E402
from fastav.train import TrainingError  # noqa: E402
from fastav.train.engine import CheckpointError as ResumeError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    _, cfg = parse("launch/avm.py", __doc__.split("\n")[0], argv)
    from fastav.continual.avm_stage import avm_stage

    try:
        result = avm_stage(cfg)
    except (ConfigError, CheckpointError, ResumeError, TrainingError) as err:
        return fail(err)
    if result.rank == 0:
        ev = result.stage_results[-1].get("eval", {}) if result.stage_results else {}
        data = "synthetic clips" if cfg.data.source == "synthetic" else cfg.data_root()
        print(
            f"done: AVM stage, recipe {cfg.recipe}, data {data}; step {result.step}, test L_AVM {ev.get('loss_avm')}, "
            f"matching accuracy {ev.get('avm_acc')} on {ev.get('clips')} clips; AVM weights "
            f"{result.run_dir / 'avm.safetensors'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
