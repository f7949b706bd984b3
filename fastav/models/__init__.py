"""Models: one audio-video encoder family (CAV-MAE, STELLA's backbone), the MAE decoder, STELLA's AVM module,
the fine-tuning classifier, and checkpoint import / export.

Canonical token order and patch layout: :mod:`fastav.models.layers` (audio time-major ``t * Fp + f``).
Nothing here knows about DeepSpeed; :mod:`fastav.train.engine` wraps these modules.
"""

from fastav.config import Config
from fastav.models.avm import AVMatching, AVMProjections, matching_loss, matching_pairs
from fastav.models.avmae import AVMAE, AVEncoder, MAEDecoder, MaskPlan, PretrainOutput
from fastav.models.classifier import AVClassifier
from fastav.models.layers import TokenGrid, count_parameters, patchify_audio, patchify_video
from fastav.models.losses import info_nce, masked_mse
from fastav.models.weights import (
    CheckpointError,
    LoadReport,
    adapt_imagenet_mae,
    export_cavmae,
    export_stella,
    load_cavmae,
    load_init,
    load_stella,
    load_weights,
    save_weights,
)


def build_pretrain_model(cfg: Config) -> AVMAE:
    """The pre-training model (encoder + decoder + losses) of ``cfg.model`` on ``cfg.data``'s token grid."""
    return AVMAE(cfg.model, TokenGrid.from_config(cfg))


def build_avm(cfg: Config) -> AVMatching:
    """STELLA's AVM module at the encoder width of ``cfg.model``."""
    m = cfg.model
    return AVMatching(m.embed_dim, m.num_heads, layout=m.avm_layout, backend=m.attention)


def build_classifier(cfg: Config, num_classes: int) -> AVClassifier:
    """The fine-tuning model (encoder + mean pooling + head)."""
    return AVClassifier(cfg.model, TokenGrid.from_config(cfg), num_classes)


__all__ = [
    "AVClassifier",
    "AVEncoder",
    "AVMAE",
    "AVMProjections",
    "AVMatching",
    "CheckpointError",
    "LoadReport",
    "MAEDecoder",
    "MaskPlan",
    "PretrainOutput",
    "TokenGrid",
    "adapt_imagenet_mae",
    "build_avm",
    "build_classifier",
    "build_pretrain_model",
    "count_parameters",
    "export_cavmae",
    "export_stella",
    "info_nce",
    "load_cavmae",
    "load_init",
    "load_stella",
    "load_weights",
    "masked_mse",
    "matching_loss",
    "matching_pairs",
    "patchify_audio",
    "patchify_video",
    "save_weights",
]
