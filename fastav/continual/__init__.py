"""Continual audio-video pre-training: the replay memory, the methods (Finetune, Multitask, ER, DER++, LUMP) and
the runs (pre-training, continual) that plug them into :mod:`fastav.train`."""

from fastav.continual.memory import Field, ReplayMemory, clip_fields
from fastav.continual.methods import ER, LUMP, METHODS, AVMethod, DERpp, Finetune, Multitask, ReplayMethod
from fastav.continual.runner import build_method, continual, continual_stages, pretrain

__all__ = [
    "AVMethod",
    "DERpp",
    "ER",
    "Field",
    "Finetune",
    "LUMP",
    "METHODS",
    "Multitask",
    "ReplayMemory",
    "ReplayMethod",
    "build_method",
    "clip_fields",
    "continual",
    "continual_stages",
    "pretrain",
]
