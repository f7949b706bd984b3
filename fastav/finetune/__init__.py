"""Downstream fine-tuning: classification probes and CAV-MAE's full fine-tuning, MLA (alternating unimodal
adaptation) and the joint-training baselines it is compared with, and the run that plugs them into
:mod:`fastav.train` (``launch/finetune.py``)."""

from fastav.finetune.balance import MLA, OGMGE, PAIR_METHODS, QMF, Concat, entropy_weights, fuse
from fastav.finetune.methods import (
    CLASSIFY_METHODS,
    CavmaeFinetune,
    FinetuneMethod,
    LinearProbe,
    StellaProbe,
    load_backbone,
)
from fastav.finetune.projection import HeadProjector, project_gradient
from fastav.finetune.runner import FinetuneResult, build_method, finetune

__all__ = [
    "CLASSIFY_METHODS",
    "CavmaeFinetune",
    "Concat",
    "FinetuneMethod",
    "FinetuneResult",
    "HeadProjector",
    "LinearProbe",
    "MLA",
    "OGMGE",
    "PAIR_METHODS",
    "QMF",
    "StellaProbe",
    "build_method",
    "entropy_weights",
    "finetune",
    "fuse",
    "load_backbone",
    "project_gradient",
]
