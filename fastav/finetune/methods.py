"""Classification fine-tuning of a pre-trained audio-video encoder: the common method base and three protocols.

Every fine-tuning method is a :class:`~fastav.train.method.Method` whose ``model`` is the classifier (backbone
and head, exported as ``weights.safetensors``), and which adds ``predict(fbank, video)``: class scores of each of
its outputs ('fused' for a prediction from both modalities, 'audio' / 'video' for one modality), softmax
probabilities for single-label data and sigmoid ones for multi-label data (``method.classify.labels``). Given more
frames than the model takes (CAV-MAE's 10-frame evaluation, ``method.classify.multi_frame_eval``), ``predict``
runs the model on each frame in turn and averages the scores, as CAV-MAE's evaluation does.

The protocols (``method.name``):

- ``linear_probe``: CAV-MAE's head (LayerNorm + Linear) on the mean of the tokens of ``method.classify.mode``
  (CAV-MAE's ``freeze_base=True``); the backbone is frozen and kept in eval mode.
- ``stella_probe``: STELLA's downstream protocol: its MLP head (pooler tanh -> Linear -> LN -> GELU -> Linear) on
  [mean joint audio tokens, mean joint video tokens] of the frozen backbone
  (:class:`~fastav.models.heads.JointMeanClassifier`). Recipe ``stella_probe_vggsound``: AdamW 5e-4, betas
  (0.95, 0.999), weight decay 5e-6, 2 warm-up epochs then cosine, 15 epochs.
- ``cavmae_ft``: CAV-MAE's end-to-end fine-tuning (:class:`~fastav.models.classifier.AVClassifier`, trainable
  positions): two parameter groups per part (weight decay on matrices only), the head's at
  ``train.lr * method.classify.head_lr_mult``; weight averaging of end-of-epoch weights and the 10-frame
  evaluation come from ``method.classify`` and the runner.

Loss: cross-entropy against the label rows (soft targets: label smoothing and mixup arrive in them) for
single-label data, binary cross-entropy for multi-label data, both in fp32.

The backbone comes from ``model.init`` (:func:`load_backbone`): the encoder part of any fastav weights file (a
pre-training or continual run's ``weights.safetensors``, or a fine-tuned classifier) or of an official CAV-MAE /
STELLA checkpoint; empty means a randomly initialised backbone (the baseline a probe is compared with).

Shape suffixes: B batch, T frames, C classes, D width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastav.config import Config
from fastav.log import get_logger
from fastav.models import AVClassifier, CheckpointError, TokenGrid
from fastav.models.avmae import AVEncoder
from fastav.models.heads import JointMeanClassifier
from fastav.models.weights import load_cavmae, load_stella, read_state_dict
from fastav.train.engine import parameter_groups
from fastav.train.method import Method, StepOutput

log = get_logger("fastav.finetune")

OUTPUT_OF_MODE = {"multimodal": "fused", "audioonly": "audio", "videoonly": "video"}
"""The output a classifier's mode produces."""


class FinetuneMethod(Method):
    """Base of every fine-tuning method: inputs, loss, scores, multi-frame prediction."""

    primary: ClassVar[str] = "fused"
    """The output whose validation score selects checkpoints (instances may override it)."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.multilabel = cfg.method.classify.labels == "multi"
        self.frames = cfg.data.num_frames
        self._frozen: nn.Module | None = None

    # --- pieces ---------------------------------------------------------------------------------------------------

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(fbank, video, labels)``: inputs in the model's dtype, labels in fp32."""
        dtype = self.input_dtype()
        return batch["fbank"].to(dtype), batch["video"].to(dtype), batch["labels"].float()

    def loss_of(self, logits_BC: Tensor, labels_BC: Tensor) -> Tensor:
        """Mean cross-entropy (soft targets) or binary cross-entropy, in fp32."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits_BC.float(), labels_BC)
        return F.cross_entropy(logits_BC.float(), labels_BC)

    def hits(self, logits_BC: Tensor, labels_BC: Tensor) -> Tensor:
        """Fraction of the batch whose top class is the label's (a logged device scalar)."""
        return (logits_BC.argmax(dim=1) == labels_BC.argmax(dim=1)).float().mean()

    def probabilities(self, logits_BC: Tensor) -> Tensor:
        return torch.sigmoid(logits_BC.float()) if self.multilabel else torch.softmax(logits_BC.float(), dim=1)

    def freeze(self, module: nn.Module) -> None:
        """Freeze ``module`` (a probed backbone): no gradient, no optimizer state, always in eval mode."""
        module.requires_grad_(False)
        self._frozen = module
        module.eval()

    def train(self, mode: bool = True) -> FinetuneMethod:
        super().train(mode)
        if self._frozen is not None:
            self._frozen.eval()  # no stochastic depth or dropout in a frozen backbone
        return self

    # --- what subclasses provide ----------------------------------------------------------------------------------

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Class logits (B, C) of each output."""
        raise NotImplementedError

    def scores(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        """Class scores (probabilities) of each output."""
        return {name: self.probabilities(value) for name, value in self.logits(fbank_BTF, video_BTCHW).items()}

    @torch.no_grad()
    def predict(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        """Scores of each output; with more frames than the model takes, the mean over runs of ``self.frames``."""
        dtype = self.input_dtype()
        fbank_BTF, video_BTCHW = fbank_BTF.to(dtype), video_BTCHW.to(dtype)
        T, k = video_BTCHW.shape[1], self.frames
        if T == k:
            return self.scores(fbank_BTF, video_BTCHW)
        if T % k:
            raise ValueError(f"predict: {T} frames per clip are not a whole number of the model's {k}")
        runs = [self.scores(fbank_BTF, video_BTCHW[:, i : i + k]) for i in range(0, T, k)]
        return {name: torch.stack([r[name] for r in runs]).mean(dim=0) for name in runs[0]}

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank, video, labels = self.inputs(batch)
        (name, logits), *_ = self.logits(fbank, video).items()
        loss = self.loss_of(logits, labels)
        terms = {"loss": loss.detach()}
        if not self.multilabel:
            terms[f"acc_{name}"] = self.hits(logits, labels)
        return StepOutput(loss, terms)


# ---------------------------------------------------------------------------------------------------------------------
# Classification protocols
# ---------------------------------------------------------------------------------------------------------------------


class LinearProbe(FinetuneMethod):
    """CAV-MAE's head (LayerNorm + Linear) on the frozen backbone's mean-pooled tokens of ``classify.mode``."""

    name: ClassVar[str] = "linear_probe"

    def __init__(self, cfg: Config, model: AVClassifier) -> None:
        super().__init__(cfg, model)
        self.mode = cfg.method.classify.mode
        self.primary = OUTPUT_OF_MODE[self.mode]
        self.freeze(model.encoder)

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            pooled_BD = self.model.pooled(fbank_BTF, video_BTCHW, self.mode)
        return {self.primary: self.model.mlp_head(pooled_BD)}


class StellaProbe(FinetuneMethod):
    """STELLA's MLP head on [mean joint audio, mean joint video] of the frozen backbone."""

    name: ClassVar[str] = "stella_probe"

    def __init__(self, cfg: Config, model: JointMeanClassifier) -> None:
        super().__init__(cfg, model)
        self.freeze(model.encoder)

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            pooled_BD = self.model.pooled(fbank_BTF, video_BTCHW)
        return {"fused": self.model.head(pooled_BD)}


class CavmaeFinetune(FinetuneMethod):
    """CAV-MAE's end-to-end fine-tuning: backbone at train.lr, head at train.lr x classify.head_lr_mult."""

    name: ClassVar[str] = "cavmae_ft"

    def __init__(self, cfg: Config, model: AVClassifier) -> None:
        super().__init__(cfg, model)
        self.mode = cfg.method.classify.mode
        self.primary = OUTPUT_OF_MODE[self.mode]

    def param_groups(self, train: Any) -> list[dict[str, Any]]:
        """Backbone and head, each split into weight-decayed matrices and the rest (CAV-MAE's two lr groups)."""
        backbone = parameter_groups(self.model.encoder, train.weight_decay)
        head = parameter_groups(self.model.mlp_head, train.weight_decay)
        for group in backbone:
            group["name"] = "backbone"
        for group in head:
            group.update(name="head", lr=train.lr * self.cfg.method.classify.head_lr_mult)
        return [g for g in backbone + head if g["params"]]

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        return {self.primary: self.model(fbank_BTF, video_BTCHW, self.mode)}


CLASSIFY_METHODS: dict[str, type[FinetuneMethod]] = {m.name: m for m in (LinearProbe, StellaProbe, CavmaeFinetune)}


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------


class _EncoderHolder(nn.Module):
    """An encoder under the key prefix ``encoder.``, for the official key maps (which need a ``grid``)."""

    def __init__(self, encoder: AVEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid


def load_backbone(encoder: AVEncoder, cfg: Config) -> str:
    """Load ``model.init`` into ``encoder``; returns a line for the log.

    A ``.safetensors`` file is a fastav weights file: its ``encoder.*`` tensors must cover the whole encoder (a
    decoder or a head beside them is ignored). Anything else is an official CAV-MAE or STELLA checkpoint read in
    ``model.arch``'s layout; keys it lacks keep their initial values and are reported.
    """
    path = cfg.model.init
    if not path:
        return "model.init is empty: randomly initialised backbone"
    if not str(path).endswith(".safetensors"):
        loader = load_cavmae if cfg.model.arch == "cavmae" else load_stella
        return str(loader(_EncoderHolder(encoder), path, strict=False))
    state, name = read_state_dict(path)
    prefix = "encoder."
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not mine:
        raise CheckpointError(f"model.init: {name} holds no encoder.* tensors (is it a fastav weights file?)")
    try:
        encoder.load_state_dict(mine, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"model.init: {name} does not fit this encoder (check model.* and data.* sizes against the run that "
            f"wrote it): {err}"
        ) from None
    return f"{name}: {len(mine)} encoder tensors loaded, {len(state) - len(mine)} other tensors ignored"


def build_classify_method(cfg: Config, num_classes: int) -> FinetuneMethod:
    """The classifier of ``method.name`` with its backbone from ``model.init``."""
    grid = TokenGrid.from_config(cfg)
    name = cfg.method.name
    model: nn.Module
    if name == "stella_probe":
        model = JointMeanClassifier(cfg.model, grid, num_classes)
    else:
        model = AVClassifier(cfg.model, grid, num_classes)
    log.info("backbone: %s", load_backbone(model.encoder, cfg))
    return CLASSIFY_METHODS[name](cfg, model)
