"""A method defined outside fastav, trained through fastav's Trainer and Engine (run in a fresh process by the tests).

    python tests/train/toy_run.py OUT_JSON [--nan-steps 3,4] [section.field=value ...]

The toy method regresses the mean fbank of each clip from its mean video through one Linear layer, adds an extra
loss term (an L2 penalty on the weight), and counts its ``after_step`` calls on the device; with ``--nan-steps``
its loss is NaN on those (1-based) steps. The JSON records, per step, the weight checksum after the step and the
fused optimizer's step count, and the ``after_step`` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastav.config import load_config
from fastav.data import SyntheticAV
from fastav.train import Method, Stage, StepOutput, Trainer, TrainingError
from fastav.train.engine import init_distributed, seed_everything
from fastav.train.trainer import resolve_run_dir


class Toy(Method):
    name = "toy"

    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__()
        self.model = nn.Linear(3, 1)
        self.nan_steps = nan_steps
        self.calls = 0
        self.after = torch.zeros((), dtype=torch.int64)
        self.records: list[dict[str, float]] = []

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        self.calls += 1
        x = batch["video"].float().mean(dim=(1, 3, 4))  # (B, 3)
        y = batch["fbank"].float().mean(dim=(1, 2))[:, None]
        main = ((self.model(x) - y) ** 2).mean()
        extra = 0.01 * self.model.weight.pow(2).sum()
        loss = main + extra
        if self.calls in self.nan_steps:
            loss = loss * float("nan")
        return StepOutput(loss, {"loss": loss.detach(), "main": main.detach(), "extra": extra.detach()})

    def after_step(self, batch: Mapping[str, Tensor], out: StepOutput) -> None:
        self.after += 1  # on the device, no host read
        opt_state = [s["step"] for s in self.optimizer_state().values()]
        self.records.append(
            {
                "weight_sum": float(self.model.weight.detach().double().sum()),
                "opt_step": float(opt_state[0]) if opt_state else 0.0,
                "batch_rows": int(batch["index"].shape[0]),
            }
        )

    def optimizer_state(self) -> dict:
        return self._optimizer.state if hasattr(self, "_optimizer") else {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--nan-steps", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    cfg = load_config("debug", ["data.source=synthetic", "data.synthetic_clips=48", *args.overrides])
    dist = init_distributed(cfg)
    seed_everything(cfg.train.seed)
    method = Toy({int(s) for s in args.nan_steps.split(",") if s})
    run_dir = resolve_run_dir(cfg, dist)

    def make_loader(stage: Stage) -> SyntheticAV:
        return SyntheticAV(cfg, "train", rank=dist.rank, world_size=dist.world_size)

    trainer = Trainer(cfg, method, dist=dist, run_dir=run_dir, make_loader=make_loader)
    method._optimizer = trainer.engine.optimizer
    status = 0
    try:
        trainer.run([Stage(0, "toy", cfg.train.epochs)])
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 1
    out = {"after_step": int(method.after), "forward_calls": method.calls, "records": method.records}
    with open(args.out, "w") as f:
        json.dump(out, f)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
