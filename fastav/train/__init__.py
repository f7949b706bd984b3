"""Training: the method contract, the DeepSpeed engine (the only DeepSpeed-aware module) and the loop.

``fastav.train.engine`` imports DeepSpeed lazily, when an engine is built or the process group started.
"""

from fastav.train.engine import (
    CheckpointError,
    DistInfo,
    Engine,
    build_optimizer,
    build_scheduler,
    init_distributed,
    list_checkpoints,
    lr_factor,
    parameter_groups,
)
from fastav.train.method import Method, Stage, StepOutput
from fastav.train.trainer import RunResult, Trainer, TrainingError

__all__ = [
    "CheckpointError",
    "DistInfo",
    "Engine",
    "Method",
    "RunResult",
    "Stage",
    "StepOutput",
    "Trainer",
    "TrainingError",
    "build_optimizer",
    "build_scheduler",
    "init_distributed",
    "list_checkpoints",
    "lr_factor",
    "parameter_groups",
]
