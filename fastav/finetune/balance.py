"""MLA and the joint-training baselines it is compared with, on one pair of unimodal encoders.

All four methods train an :class:`~fastav.models.unimodal.EncoderPair` (fastav's audio and video branches from a
pre-trained checkpoint, or MLA's ResNet-18 pair; ``method.mla.encoders``) and report an 'audio', a 'video' and a
'fused' output; single-label data only (softmax cross-entropy, accuracy).

- ``mla`` (:class:`MLA`): alternating unimodal adaptation. Per batch an audio step, then a video step; each runs
  its encoder and the one shared linear head ``W z + b``, takes its own backward and its own optimizer step over
  that encoder's and the head's parameter groups only (:meth:`fastav.train.engine.Engine.step` with ``groups``),
  so the resting encoder gets no momentum and no weight decay, under ZeRO-1/2 too (where its flat gradient
  partition exists and holds zeros). That is the behaviour of the official code under torch >= 2.0
  (``zero_grad(set_to_none=True)``, a parameter without gradient is skipped); under the torch 1.8 it pins,
  ``zero_grad`` leaves zero tensors and the resting encoder still moves by momentum and weight decay at the
  other modality's step. The video step sees the head the audio step just updated. The head's weight gradient
  goes through the paper's projection (:mod:`fastav.finetune.projection`), which the official code never runs.
  There is no fused loss in training.

  Test-time fusion from the unimodal logits ``o_m``: fixed weights (``method.mla.fusion_weights``, the official
  0.55 / 0.45) or per-sample entropy weights ``lambda = softmax over modalities of -H(softmax(o_m))`` (the paper;
  the official code takes the softmax over the batch axis and sums the entropy over the whole batch, giving one
  weight per modality per test batch). Both are reported ('fused_fixed', 'fused_entropy'); 'fused' is the one
  ``method.mla.fusion`` names.
- ``concat`` (MLA's "normal" baseline): joint late fusion ``Linear(2d, C)`` on [z_a, z_v], one cross-entropy; the
  unimodal outputs use each half of the weight and half the bias, as the official code.
- ``ogm_ge``: concat plus OGM-GE (Peng et al., CVPR 2022). Per batch ``s_m = sum_i softmax(o_m)_i[y_i]`` (summed
  over all ranks), ``rho = s_v / s_a``; the dominant modality's encoder gradients are scaled by
  ``1 - tanh(alpha * relu(rho))`` (the official formula; the other's by 1) and, with ``method.ogm.noise``, get
  ``N(0, std(g) + 1e-8)`` noise, in epochs ``start_epoch .. end_epoch``. The official code modulates parameters
  whose gradient is 4-D (convolutions; with ResNet-18 that is every encoder weight but BatchNorm's); fastav
  modulates every encoder parameter with two or more dimensions, the same set on ResNet-18 and the weight
  matrices of a transformer branch (the official rule would leave a transformer untouched). The modulation
  acts through gradient hooks on those parameters, before DeepSpeed accumulates or reduces anything.
- ``qmf`` (Zhang et al., ICML 2023): one head per modality, confidence ``c_m = logsumexp(o_m) / energy_scale``,
  fused ``o = sum_m o_m * stopgrad(c_m)``; loss ``CE(o) + sum_m CE(o_m) + rank_weight * sum_m rank_m`` (the
  official ResNet path). Each training clip's per-modality losses accumulate in a history table indexed by the
  clip's ``index`` (gathered from all ranks, so every rank holds the same table); the ranking loss pairs each clip
  with its neighbour in the batch and asks the one with the larger normalised cumulative loss for the lower
  confidence, by at least the difference (``MarginRankingLoss``, as QMF). Normalisation is by the minimum and
  maximum over the clips seen so far (the official code's ``History`` over its whole table).

Parameter groups ('audio', 'video', 'head'; QMF 'head' holds both heads): weight decay on every parameter, as the
official code's single SGD over ``model.parameters()``.

Shape suffixes: B batch, D feature width, C classes, M modalities.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastav.config import Config, ConfigError
from fastav.finetune.methods import FinetuneMethod, load_backbone
from fastav.finetune.projection import HeadProjector, alpha_at, project_gradient
from fastav.log import get_logger
from fastav.models import TokenGrid
from fastav.models.avmae import AVEncoder
from fastav.models.unimodal import EncoderPair, branch_pair, resnet_pair
from fastav.train.method import Stage, StepOutput

log = get_logger("fastav.finetune")

MODALITIES = ("audio", "video")


# ---------------------------------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------------------------------


def entropy(logits_BC: Tensor) -> Tensor:
    """(B,) entropy of softmax(logits) over classes, per sample."""
    logp = F.log_softmax(logits_BC.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def entropy_weights(*logits_BC: Tensor) -> Tensor:
    """(B, M) per-sample fusion weights: softmax over the modalities of minus their entropies (rows sum to 1; the
    more confident modality weighs more)."""
    return torch.softmax(-torch.stack([entropy(x) for x in logits_BC], dim=1), dim=1)


def fuse(weights_BM: Tensor, *logits_BC: Tensor) -> Tensor:
    """sum_m weights[:, m] * logits_m: (B, C)."""
    return sum(weights_BM[:, m, None] * x.float() for m, x in enumerate(logits_BC))


# ---------------------------------------------------------------------------------------------------------------------
# The model all four methods train
# ---------------------------------------------------------------------------------------------------------------------


class PairClassifier(nn.Module):
    """Two unimodal encoders (``encoders.audio`` / ``encoders.video``) and the method's heads (``heads``)."""

    def __init__(self, encoders: EncoderPair, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.encoders = encoders
        self.heads = nn.ModuleDict(heads)

    def features(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoders.audio(fbank_BTF), self.encoders.video(video_BTCHW)


def build_encoders(cfg: Config) -> EncoderPair:
    """``method.mla.encoders``: fastav's branches (weights from ``model.init``) or a ResNet-18 pair from scratch."""
    mla = cfg.method.mla
    if mla.encoders == "resnet18":
        if cfg.model.init:
            raise ConfigError(
                f"model.init: got {cfg.model.init!r}; accepted: empty with method.mla.encoders=resnet18 (the ResNet-18 "
                f"pair trains from scratch); use method.mla.encoders=backbone to start from fastav weights"
            )
        return resnet_pair(mla.resnet_width)
    encoder = AVEncoder(cfg.model, TokenGrid.from_config(cfg))
    log.info("backbone: %s", load_backbone(encoder, cfg))
    return branch_pair(encoder)


class PairMethod(FinetuneMethod):
    """Base of the four methods: the encoder pair, named parameter groups, the three outputs."""

    def __init__(self, cfg: Config, model: PairClassifier) -> None:
        super().__init__(cfg, model)
        if self.multilabel:
            raise ConfigError(
                f"method.classify.labels: got 'multi'; accepted: 'single' for method.name='{cfg.method.name}' "
                f"(MLA, its fusion and its baselines are single-label classifiers)"
            )
        self.epoch = 0

    def param_groups(self, train: Any) -> list[dict[str, Any]]:
        """'audio', 'video' and 'head' groups, weight decay on every parameter (the official single SGD)."""
        parts = {"audio": self.model.encoders.audio, "video": self.model.encoders.video, "head": self.model.heads}
        groups = []
        for name, module in parts.items():
            params = [p for p in module.parameters() if p.requires_grad]
            groups.append({"name": name, "params": params, "weight_decay": train.weight_decay})
        return groups

    def on_stage_start(self, stage: Stage) -> None:
        self.epoch = stage.index  # the fine-tuning runner trains one epoch per stage

    def terms_of(self, loss: Tensor, out: Mapping[str, Tensor], labels_BC: Tensor) -> dict[str, Tensor]:
        return {"loss": loss.detach(), **{f"acc_{k}": self.hits(v.detach(), labels_BC) for k, v in out.items()}}


# ---------------------------------------------------------------------------------------------------------------------
# MLA
# ---------------------------------------------------------------------------------------------------------------------


class MLA(PairMethod):
    """Alternating unimodal steps through one shared head, the head gradient projection, test-time fusion."""

    name: ClassVar[str] = "mla"
    manual_steps: ClassVar[bool] = True

    def __init__(self, cfg: Config, model: PairClassifier) -> None:
        super().__init__(cfg, model)
        mla = cfg.method.mla
        self.projection = mla.projection
        self.alpha_base = mla.projection_alpha
        self.fixed = tuple(mla.fusion_weights)
        self.fusion = mla.fusion
        self.projector = HeadProjector(model.encoders.dim, normalize=mla.normalize_projector)
        self.batches_per_epoch = 1
        """Batches per epoch (the runner sets it from the training loader): N of alpha = base ** (1 + i / N)."""

    @property
    def head(self) -> nn.Linear:
        return self.model.heads["shared"]

    def head_logits(self, z_BD: Tensor, *, projected: bool = False) -> Tensor:
        weight = project_gradient(self.head.weight, self.projector.P) if projected else self.head.weight
        return F.linear(z_BD, weight, self.head.bias)

    def mean_feature(self, z_BD: Tensor) -> Tensor:
        """The batch mean over all ranks (so that every rank's projector stays the same)."""
        mean_D = z_BD.detach().float().mean(dim=0)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(mean_D)
            mean_D /= torch.distributed.get_world_size()
        return mean_D

    def manual_step(self, batch: Mapping[str, Tensor], engine: Any) -> StepOutput:
        fbank, video, labels = self.inputs(batch)
        if self.projector.P.device != fbank.device:
            self.projector.P = self.projector.P.to(fbank.device)
        terms: dict[str, Tensor] = {}
        total = fbank.new_zeros((), dtype=torch.float32)
        for modality, x in zip(MODALITIES, (fbank, video), strict=True):
            step = engine.global_step  # optimizer steps so far: 2 per batch
            z_BD = self.model.encoders.encode(modality, x)
            project = self.projection and step > 0  # the very first step is not projected (as the paper)
            if project:
                batch_in_epoch = (step // len(MODALITIES)) % self.batches_per_epoch
                self.projector.update(self.mean_feature(z_BD), alpha_at(self.alpha_base, batch_in_epoch,
                                                                        self.batches_per_epoch))  # fmt: skip
            logits = self.head_logits(z_BD, projected=project)
            loss = self.loss_of(logits, labels)
            engine.backward(loss)
            engine.step(groups=(modality, "head"))
            terms[f"loss_{modality}"] = loss.detach()
            terms[f"acc_{modality}"] = self.hits(logits.detach(), labels)
            total = total + loss.detach()
        return StepOutput(total, {"loss": total, **terms})

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        z_a, z_v = self.model.features(fbank_BTF, video_BTCHW)
        o_a, o_v = self.head_logits(z_a), self.head_logits(z_v)
        w_a, w_v = self.fixed
        fixed = w_a * o_a.float() + w_v * o_v.float()
        adaptive = fuse(entropy_weights(o_a, o_v), o_a, o_v)
        chosen = adaptive if self.fusion == "entropy" else fixed
        return {"audio": o_a, "video": o_v, "fused": chosen, "fused_entropy": adaptive, "fused_fixed": fixed}

    def rank_state(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict()}

    def load_rank_state(self, state: Mapping[str, Any]) -> None:
        if "projector" in state:
            self.projector.load_state_dict(state["projector"])


# ---------------------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------------------


class Concat(PairMethod):
    """Joint training of Linear(2d, C) on [z_a, z_v] (MLA's "normal" baseline)."""

    name: ClassVar[str] = "concat"

    def split_logits(self, z_a: Tensor, z_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(fused, audio, video) logits: the unimodal ones from each half of the weight and half the bias."""
        head: nn.Linear = self.model.heads["concat"]
        d = z_a.shape[1]
        fused = head(torch.cat([z_a, z_v], dim=1))
        half = head.bias / 2
        return fused, F.linear(z_a, head.weight[:, :d], half), F.linear(z_v, head.weight[:, d:], half)

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        fused, o_a, o_v = self.split_logits(*self.model.features(fbank_BTF, video_BTCHW))
        return {"fused": fused, "audio": o_a, "video": o_v}

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank, video, labels = self.inputs(batch)
        fused, o_a, o_v = self.split_logits(*self.model.features(fbank, video))
        loss = self.loss_of(fused, labels)
        return StepOutput(loss, self.terms_of(loss, {"fused": fused, "audio": o_a, "video": o_v}, labels))


class OGMGE(Concat):
    """Concat with on-the-fly gradient modulation (and Gaussian noise: generalisation enhancement)."""

    name: ClassVar[str] = "ogm_ge"

    def __init__(self, cfg: Config, model: PairClassifier) -> None:
        super().__init__(cfg, model)
        self.ogm = cfg.method.ogm
        self.coeff: dict[str, Tensor] = {}
        """Device scalars of the current batch, read by the gradient hooks."""
        self._hooked = False

    def _hook(self) -> None:
        """Register the modulation on the encoders' parameters as they are once the engine has placed them."""
        for modality in MODALITIES:
            for param in getattr(self.model.encoders, modality).parameters():
                if param.requires_grad and param.ndim >= 2:
                    param.register_hook(partial(self._modulate, modality))
        self._hooked = True

    def active(self) -> bool:
        return self.training and self.ogm.start_epoch <= self.epoch <= self.ogm.end_epoch

    def _modulate(self, modality: str, grad: Tensor) -> Tensor:
        if not self.active() or modality not in self.coeff:
            return grad
        out = grad * self.coeff[modality].to(grad.dtype)
        if self.ogm.noise:
            out = out + torch.randn_like(grad) * (grad.float().std() + 1e-8).to(grad.dtype)
        return out

    def coefficients(self, o_a: Tensor, o_v: Tensor, labels_BC: Tensor) -> tuple[Tensor, Tensor]:
        """OGM's (k_a, k_v) from the batch's (all ranks') summed true-class probabilities."""
        s = torch.stack([(torch.softmax(o.detach().float(), dim=1) * labels_BC).sum() for o in (o_a, o_v)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(s)
        ratio_v = s[1] / s[0].clamp_min(1e-12)
        ratio_a = 1.0 / ratio_v.clamp_min(1e-12)
        one = torch.ones_like(ratio_v)
        damp_v = 1 - torch.tanh(self.ogm.alpha * torch.relu(ratio_v))
        damp_a = 1 - torch.tanh(self.ogm.alpha * torch.relu(ratio_a))
        video_dominates = ratio_v > 1
        return torch.where(video_dominates, one, damp_a), torch.where(video_dominates, damp_v, one)

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        if not self._hooked:
            self._hook()
        fbank, video, labels = self.inputs(batch)
        fused, o_a, o_v = self.split_logits(*self.model.features(fbank, video))
        loss = self.loss_of(fused, labels)
        k_a, k_v = self.coefficients(o_a, o_v, labels)
        self.coeff = {"audio": k_a, "video": k_v}
        terms = self.terms_of(loss, {"fused": fused, "audio": o_a, "video": o_v}, labels)
        return StepOutput(loss, {**terms, "ogm_k_audio": k_a, "ogm_k_video": k_v})


class QMF(PairMethod):
    """Quality-aware multimodal fusion: energy confidences, a confidence ranking loss against loss history."""

    name: ClassVar[str] = "qmf"

    def __init__(self, cfg: Config, model: PairClassifier, *, index_bound: int) -> None:
        super().__init__(cfg, model)
        self.qmf = cfg.method.qmf
        self.index_bound = index_bound
        self.history: dict[str, Tensor] = {}
        """Per modality: the summed per-clip training loss, indexed by the clip's ``index`` (plus 'seen')."""

    def ensure_history(self, device: torch.device) -> None:
        if not self.history:
            self.history = {m: torch.zeros(self.index_bound, device=device) for m in MODALITIES}
            self.history["seen"] = torch.zeros(self.index_bound, dtype=torch.bool, device=device)

    def confidence(self, o_BC: Tensor) -> Tensor:
        return (torch.logsumexp(o_BC.float(), dim=1) / self.qmf.energy_scale)[:, None]

    def fused(self, o_a: Tensor, o_v: Tensor) -> Tensor:
        return o_a.float() * self.confidence(o_a).detach() + o_v.float() * self.confidence(o_v).detach()

    def logits(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> dict[str, Tensor]:
        z_a, z_v = self.model.features(fbank_BTF, video_BTCHW)
        o_a, o_v = self.model.heads["audio"](z_a), self.model.heads["video"](z_v)
        return {"fused": self.fused(o_a, o_v), "audio": o_a, "video": o_v}

    @torch.no_grad()
    def record(self, index_B: Tensor, losses: Mapping[str, Tensor]) -> None:
        """Add this step's per-clip losses of every rank to the history (the same on every rank)."""
        index_B = index_B.long()
        values = {m: losses[m].float() for m in MODALITIES}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            world = torch.distributed.get_world_size()
            gathered = []
            for x in (index_B, *values.values()):
                parts = [torch.empty_like(x) for _ in range(world)]
                torch.distributed.all_gather(parts, x.contiguous())
                gathered.append(torch.cat(parts))
            index_B, values = gathered[0], dict(zip(MODALITIES, gathered[1:], strict=True))
        for m in MODALITIES:
            self.history[m].index_add_(0, index_B, values[m])
        self.history["seen"][index_B] = True

    def rank_loss(self, confidence_B1: Tensor, index_B: Tensor, modality: str) -> Tensor:
        """QMF's ranking loss between each clip and its neighbour in the batch."""
        table, seen = self.history[modality], self.history["seen"]
        low = torch.where(seen, table, torch.inf).min()
        high = torch.where(seen, table, -torch.inf).max()
        norm = (table[index_B.long()] - low) / (high - low).clamp_min(1e-12)
        other = norm.roll(-1)
        target = torch.sign(norm - other)
        margin = (norm - other).abs()
        partner = confidence_B1.roll(-1, dims=0) + (margin / torch.where(target == 0, 1.0, target))[:, None]
        return F.margin_ranking_loss(confidence_B1, partner, -target[:, None], margin=0.0)

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank, video, labels = self.inputs(batch)
        self.ensure_history(labels.device)
        z_a, z_v = self.model.features(fbank, video)
        o_a, o_v = self.model.heads["audio"](z_a), self.model.heads["video"](z_v)
        fused = self.fused(o_a, o_v)
        per_clip = {
            m: F.cross_entropy(o.float(), labels, reduction="none") for m, o in zip(MODALITIES, (o_a, o_v), strict=True)
        }
        classify = self.loss_of(fused, labels) + per_clip["audio"].mean() + per_clip["video"].mean()
        self.record(batch["index"], {m: v.detach() for m, v in per_clip.items()})  # the official order: then rank
        ranks = [
            self.rank_loss(self.confidence(o), batch["index"], m) for m, o in zip(MODALITIES, (o_a, o_v), strict=True)
        ]
        rank = ranks[0] + ranks[1]
        loss = classify + self.qmf.rank_weight * rank
        terms = self.terms_of(loss, {"fused": fused, "audio": o_a, "video": o_v}, labels)
        return StepOutput(loss, {**terms, "loss_rank": rank.detach()})

    def rank_state(self) -> dict[str, Any]:
        return {"history": {k: v.cpu() for k, v in self.history.items()}}

    def load_rank_state(self, state: Mapping[str, Any]) -> None:
        if state.get("history"):
            device = next(self.model.parameters()).device
            self.history = {k: v.to(device) for k, v in state["history"].items()}


PAIR_METHODS: dict[str, type[PairMethod]] = {m.name: m for m in (MLA, Concat, OGMGE, QMF)}


def build_pair_method(cfg: Config, num_classes: int, *, index_bound: int = 0) -> PairMethod:
    """``method.name`` (mla, concat, ogm_ge, qmf) on the encoders of ``method.mla.encoders``.

    ``index_bound``: one more than the largest sample ``index`` of the training data (QMF's history table).
    """
    encoders = build_encoders(cfg)
    d = encoders.dim
    name = cfg.method.name
    heads: dict[str, nn.Module]
    if name == "mla":
        heads = {"shared": nn.Linear(d, num_classes)}
    elif name == "qmf":
        heads = {"audio": nn.Linear(d, num_classes), "video": nn.Linear(d, num_classes)}
    else:
        heads = {"concat": nn.Linear(2 * d, num_classes)}
    for head in heads.values():  # the official weight_init: Xavier-normal weights, zero biases
        nn.init.xavier_normal_(head.weight)
        nn.init.zeros_(head.bias)
    model = PairClassifier(encoders, heads)
    if name == "qmf":
        if index_bound <= 0:
            raise ValueError("qmf needs index_bound (one more than the largest training sample index)")
        return QMF(cfg, model, index_bound=index_bound)
    return PAIR_METHODS[name](cfg, model)
