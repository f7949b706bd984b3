"""Training: the DeepSpeed engine wrapper (the only DeepSpeed-aware module), pre-training loop, synthetic data.

``fastav.train.engine`` imports DeepSpeed lazily, when an engine is built or the process group started.
"""

from fastav.train.engine import (
    DistInfo,
    Engine,
    build_optimizer,
    build_scheduler,
    init_distributed,
    list_checkpoints,
    lr_factor,
    parameter_groups,
)
from fastav.train.pretrain import PretrainResult, evaluate_retrieval, pretrain, recall_at_k
from fastav.train.synthetic import SyntheticAV

__all__ = [
    "DistInfo",
    "Engine",
    "PretrainResult",
    "SyntheticAV",
    "build_optimizer",
    "build_scheduler",
    "evaluate_retrieval",
    "init_distributed",
    "list_checkpoints",
    "lr_factor",
    "parameter_groups",
    "pretrain",
    "recall_at_k",
]
