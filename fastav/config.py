"""Typed configuration: nested dataclasses, named recipes, dotted command-line overrides.

A run is described by one :class:`Config` made of seven sections (``data``, ``model``, ``train``,
``continual``, ``method``, ``eval``, ``distributed``); a section may hold sections of its own (``method.stella``).
Every field carries a docstring (``python -m fastav.config explain`` prints them). A recipe is a function
returning a complete ``Config``; recipes are built from :func:`base` by changing a few fields, so the difference
between two recipes reads as a short list.

Overrides use ``section.field=value`` (``section.sub.field=value`` at any depth) and are converted to the
field's declared type::

    cfg = load_config("debug", ["train.lr=3e-4", "continual.task_order=sports,music", "method.stella.alpha=0.3"])

Every validation error is a :class:`ConfigError` naming the field (``train.lr``), what it got and what
it accepts. The resolved config is written as ``config.json`` into each run directory
(:meth:`Config.save`) and can be read back with :meth:`Config.load`. The DeepSpeed JSON is generated
from it (:meth:`Config.deepspeed_config`), never written by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DATA_ENV = "FASTAV_DATA"
"""Environment variable read when ``data.root`` is left empty."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range; the message names the field."""


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["shards", "synthetic"] = "shards"
    """Where clips come from: the shards at data.root read by DALI, or in-memory synthetic clips (no files; for
    trying the trainer and for tests)."""
    root: str = ""
    """Dataset directory written by ``python -m shards`` (holds manifest.json). Empty: read $FASTAV_DATA."""
    synthetic_clips: int = 256
    """data.source=synthetic: training clips (a held-out set of the same size serves 'test' and 'retrieval')."""
    synthetic_classes: int = 8
    """data.source=synthetic: classes; class c belongs to task c * synthetic_tasks // synthetic_classes."""
    synthetic_tasks: int = 1
    """data.source=synthetic: continual tasks the classes are split into (named task0, task1, ...)."""
    synthetic_weak_modality: Literal["none", "audio", "video"] = "none"
    """data.source=synthetic: the modality made weaker than the other (modality imbalance, what MLA addresses):
    with probability data.synthetic_noise a clip's weak modality shows the signature of a random class instead of
    its own, so it alone cannot reach the other modality's accuracy; 'none' leaves both intact."""
    synthetic_noise: float = 0.0
    """data.source=synthetic: probability that a clip's weak modality (data.synthetic_weak_modality) carries a
    random class's signature (fixed per clip)."""
    val_fraction: float = 0.0
    """Fraction of the training split held out as the validation split 'val' (a fixed draw per dataset, the same
    for every seed); fine-tuning selects checkpoints on it, never on the test split. 0: no validation split."""
    balanced: bool = False
    """Class-balanced training sampling, CAV-MAE's sampler for AudioSet-2M and VGGSound: each epoch draws as many
    clips as the training split holds, with replacement, clip i with probability proportional to the sum over its
    labels c of 1000 / (count_c + 0.01), count_c the clips of the split labelled c (identical on every rank, which
    read disjoint positions of the draw). False: a permutation per epoch. Evaluation splits are never resampled."""
    batch_size: int = 12
    """Clips per GPU (per process) and step, before replay samples are added."""
    sampling: Literal["cavmae", "stella"] = "stella"
    """Frame sampling rule: 'cavmae' (1 frame of the 1-fps grid) or 'stella' (frames 1 s apart from a window)."""
    num_frames: int = 4
    """Frames per clip handed to the model (T of the batch contract): 1 for CAV-MAE, 4 for STELLA."""
    frame_size: int = 224
    """Side of the square frames handed to the model, in pixels."""
    eval_window_start: float = 3.0
    """Start of the fixed evaluation window in seconds (STELLA sampling); clamped to the clip."""
    target_length: int = 1024
    """Fbank frames per clip after padding or trimming (10 ms each)."""
    num_mel_bins: int = 128
    """Mel bins of the Kaldi fbank."""
    fbank_mean: float = -5.081
    """Fbank normalisation: (x - mean) / std, CAV-MAE's AudioSet / VGGSound statistics."""
    fbank_std: float = 4.4849
    """Fbank normalisation standard deviation."""
    noise: bool = True
    """Train-time audio noise + circular time roll (CAV-MAE's 'noise' option)."""
    specaug_freq: int = 0
    """SpecAugment frequency mask width (0 = off; CAV-MAE fine-tuning uses 48)."""
    specaug_time: int = 0
    """SpecAugment time mask width (0 = off; CAV-MAE fine-tuning uses 192)."""
    mixup: float = 0.0
    """Probability of mixup per sample (fine-tuning only; CAV-MAE uses 0.5)."""
    label_smoothing: float = 0.0
    """Label smoothing epsilon of the targets (fine-tuning only; CAV-MAE uses 0.1)."""
    num_threads: int = field(
        default_factory=lambda: max(
            1,
            len(os.sched_getaffinity(0))
            // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)),
        )
    )
    """CPU threads of the data pipeline (DALI) per process. Default: the cores this process may use divided by the
    processes on the node ($LOCAL_WORLD_SIZE or $LOCAL_SIZE, set by the launchers), at least 1: NVDEC decoding
    still parses every sample, and FLAC decoding runs on these threads."""
    prefetch: int = 2
    """Batches prepared ahead of the trainer."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the video and fbank tensors handed to the model."""
    max_skip_fraction: float = 0.01
    """Stop the run when more than this fraction of samples had to be skipped as undecodable."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where decoding runs: 'gpu' (NVDEC), 'cpu' (VP9 shards only) or 'auto' (gpu when CUDA is present)."""

    def validate(self) -> None:
        _positive(self, "batch_size", "num_frames", "frame_size", "target_length", "num_mel_bins", "num_threads")
        _positive(self, "prefetch", "fbank_std", "synthetic_clips", "synthetic_classes", "synthetic_tasks")
        if self.synthetic_tasks > self.synthetic_classes:
            _fail(
                self,
                "synthetic_tasks",
                self.synthetic_tasks,
                f"at most data.synthetic_classes ({self.synthetic_classes})",
            )
        _non_negative(self, "specaug_freq", "specaug_time", "eval_window_start")
        _fraction(self, "mixup", "max_skip_fraction", "label_smoothing", "synthetic_noise", closed=True)
        _fraction(self, "val_fraction", closed=False)
        if self.sampling == "cavmae" and self.num_frames != 1:
            _fail(self, "num_frames", self.num_frames, "1 when data.sampling='cavmae' (CAV-MAE uses one frame)")
        if self.specaug_freq > self.num_mel_bins:
            _fail(self, "specaug_freq", self.specaug_freq, f"at most data.num_mel_bins ({self.num_mel_bins})")
        if self.specaug_time > self.target_length:
            _fail(self, "specaug_time", self.specaug_time, f"at most data.target_length ({self.target_length})")


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["cavmae", "stella"] = "stella"
    """Model family: CAV-MAE (11+1 layers, 1 frame) or STELLA's backbone (10+2 layers, 4 frames, AVM); names the
    key layout of an official checkpoint given as model.init."""
    init: str = ""
    """Weights to start from: a fastav weights file (weights.safetensors of a run), an official CAV-MAE or STELLA
    checkpoint (.pth, read in model.arch's layout), or empty for a random initialisation."""
    embed_dim: int = 768
    """Encoder width."""
    num_heads: int = 12
    """Encoder attention heads."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP relative to embed_dim."""
    specific_depth: int = 10
    """Modality-specific layers per branch (CAV-MAE 11, STELLA 10)."""
    shared_depth: int = 2
    """Shared layers with three LayerNorm sets (CAV-MAE 1, STELLA 2)."""
    patch_size: int = 16
    """Square patch side for video frames and fbank."""
    decoder_dim: int = 512
    """MAE decoder width."""
    decoder_depth: int = 8
    """MAE decoder layers."""
    decoder_heads: int = 16
    """MAE decoder attention heads."""
    mask_ratio_a: float = 0.8
    """Fraction of audio tokens hidden from the encoder."""
    mask_ratio_v: float = 0.8
    """Fraction of video tokens hidden from the encoder."""
    audio_mask: Literal["uniform", "time", "freq", "tf"] = "uniform"
    """Audio masking pattern: uniform random, whole time columns, whole frequency rows, or both."""
    pos_embed: Literal["fixed", "learnable"] = "learnable"
    """Positional embeddings: fixed 2-D sin-cos (CAV-MAE pre-training) or learnable from sin-cos init."""
    inter_pos_embed: bool = True
    """STELLA's second positional embeddings, added right before the shared layers."""
    shared_mask_token: bool = False
    """One mask token for both modalities (CAV-MAE) instead of one per modality (STELLA)."""
    norm_pix_loss: bool = True
    """Reconstruct per-patch standardised pixels."""
    mae_weight: float = 1.0
    """Weight of each modality's reconstruction loss."""
    contrastive_weight: float = 0.1
    """Weight of the InfoNCE loss (CAV-MAE 0.01, STELLA 0.1)."""
    contrastive_tau: float = 0.05
    """InfoNCE temperature."""
    bidirectional_contrastive: bool = True
    """Average both InfoNCE directions (STELLA) instead of video->audio only (CAV-MAE)."""
    avm: bool = True
    """Build STELLA's audio-video matching (AVM) module."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention backend: PyTorch SDPA, or xformers on CUDA when installed."""
    kernels: Literal["auto", "triton", "ref"] = "auto"
    """STELLA kernels: fused Triton, plain-PyTorch reference, or auto (Triton where it can run)."""
    drop_path: float = 0.0
    """Stochastic depth rate of the encoder."""
    tagged_norms: Literal["shared", "all"] = "shared"
    """Blocks carrying the audio-only and video-only LayerNorm sets: 'shared' layers only (STELLA) or 'all'
    blocks, modality-specific and decoder included, where they are unused but present (CAV-MAE's code: they
    are in its checkpoints and its 191.0 M parameter count)."""
    decoder_joint: bool = False
    """Decode audio and video as one joint sequence (CAV-MAE) instead of separately with shared weights (STELLA)."""
    gather_negatives: bool = True
    """InfoNCE negatives from every data-parallel rank (STELLA) instead of the local batch only (CAV-MAE's
    DataParallel sub-batches)."""
    gather_grad: bool = False
    """With gather_negatives: the InfoNCE gradient of the gathered rows goes back to the ranks that hold them, so
    data-parallel training follows the gradient of one InfoNCE over the gathered batch. Off (STELLA), each rank
    back-propagates its own rows only: the push of the other ranks' anchors is lost and a rank's rows are pulled
    together, which collapses the pooled features of a randomly initialised model."""
    avm_layout: Literal["standard", "official"] = "standard"
    """AVM output layout before token pooling: 'standard' (heads concatenated per token) or 'official'
    (STELLA's reshape without moving the head axis, needed to reproduce its released AVM weights)."""

    def validate(self) -> None:
        _positive(self, "embed_dim", "num_heads", "mlp_ratio", "specific_depth", "patch_size")
        _positive(self, "decoder_dim", "decoder_depth", "decoder_heads", "contrastive_tau")
        _non_negative(self, "shared_depth", "mae_weight", "contrastive_weight")
        _fraction(self, "mask_ratio_a", "mask_ratio_v", closed=False)
        _fraction(self, "drop_path", closed=False)
        if self.embed_dim % self.num_heads:
            _fail(self, "embed_dim", self.embed_dim, f"a multiple of model.num_heads ({self.num_heads})")
        if self.decoder_dim % self.decoder_heads:
            _fail(self, "decoder_dim", self.decoder_dim, f"a multiple of model.decoder_heads ({self.decoder_heads})")
        if self.avm and self.shared_depth == 0:
            _fail(self, "avm", self.avm, "false when model.shared_depth=0 (the AVM reads the shared layers)")
        if self.embed_dim % 4:
            _fail(self, "embed_dim", self.embed_dim, "a multiple of 4 (2-D sin-cos positional embeddings)")
        if self.decoder_dim % 4:
            _fail(self, "decoder_dim", self.decoder_dim, "a multiple of 4 (2-D sin-cos positional embeddings)")


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = ""
    """Directory for config.json, logs, metrics and checkpoints. Empty: runs/<recipe>-<timestamp>."""
    seed: int = 2021
    """Seed of every random choice of the run (data order, masking, selection, init)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimizer (both papers use Adam with decoupled-free weight decay; MLA uses SGD with momentum)."""
    momentum: float = 0.9
    """SGD momentum (train.optimizer=sgd)."""
    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, ...] = (0.95, 0.999)
    """Adam betas."""
    weight_decay: float = 5e-7
    """Weight decay (not applied to biases, norms, embeddings and mask tokens)."""
    schedule: Literal["constant", "multistep", "cosine"] = "constant"
    """Learning-rate schedule."""
    milestones: tuple[int, ...] = ()
    """Epochs at which 'multistep' multiplies the lr by gamma."""
    gamma: float = 0.5
    """Multiplier of the 'multistep' schedule."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (0 = none)."""
    epochs: int = 25
    """Epochs of pre-training or fine-tuning (continual runs use continual.epochs_per_task)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = no limit); for smoke runs."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 0.0
    """Gradient-norm clipping (0 = off)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision."""
    log_every: int = 20
    """Steps between metric log lines (the only steps that read values back from the device)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0 = only at the end of each task or epoch)."""
    tensorboard: bool = True
    """Also write TensorBoard event files next to metrics.jsonl."""
    resume: str = ""
    """Checkpoint to resume from: a checkpoint directory (run_dir/checkpoints/step_000100), 'auto' (the latest
    one in run_dir/checkpoints, or a fresh start when there is none) or empty (fresh start)."""
    keep_checkpoints: int = 3
    """Step checkpoints kept in run_dir/checkpoints; older ones are deleted after each save (0 = keep all). The
    checkpoint at the end of each stage (a continual task) is always kept."""
    max_bad_steps: int = 20
    """A step whose loss is NaN or infinite on any rank is skipped (no parameter or optimizer-state change) and
    counted; the run stops after this many in a row (checked at each logging step)."""

    def validate(self) -> None:
        _positive(self, "lr", "epochs", "grad_accum", "log_every", "gamma")
        _non_negative(self, "weight_decay", "warmup_epochs", "max_steps", "grad_clip", "checkpoint_every")
        _non_negative(self, "keep_checkpoints")
        _positive(self, "max_bad_steps")
        _fraction(self, "momentum", closed=False)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail(self, "betas", self.betas, "two numbers in [0, 1), e.g. 0.95,0.999")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m <= 0 for m in self.milestones):
            _fail(self, "milestones", self.milestones, "strictly increasing positive epochs, e.g. 10,15,20")
        if self.schedule == "multistep" and not self.milestones:
            _fail(self, "milestones", self.milestones, "at least one epoch when train.schedule='multistep'")


@dataclass(kw_only=True)
class ContinualConfig:
    task_order: tuple[str, ...] = ()
    """Task names in training order. Empty: the continual tasks of the dataset manifest, in its order."""
    epochs_per_task: int = 10
    """Epochs on each task (STELLA: 10 VGGSound, 15 AudioSet); the multitask method trains this many epochs on the
    union of the tasks."""

    def validate(self) -> None:
        _positive(self, "epochs_per_task")
        if len(set(self.task_order)) != len(self.task_order):
            _fail(self, "task_order", self.task_order, "each task at most once")


@dataclass(kw_only=True)
class DerppConfig:
    alpha: float = 0.5
    """Weight of the MSE between the stored and the current mean-pooled audio and video embeddings of the replayed
    clips (DER++ as STELLA's baseline code runs it)."""

    def validate(self) -> None:
        _non_negative(self, "alpha")


@dataclass(kw_only=True)
class LumpConfig:
    mix_alpha: float = 0.5
    """LUMP's mixup coefficient: one lambda ~ Beta(mix_alpha, mix_alpha) per batch mixes the current clips with the
    replay draw."""

    def validate(self) -> None:
        _positive(self, "mix_alpha")


@dataclass(kw_only=True)
class StellaConfig:
    core_video_ratio: float = 0.5
    """Fraction of video patches dropped from the candidate set (STELLA's core_video_ratio): 392 of 784 kept."""
    core_audio_ratio: float = 0.5
    """Fraction of audio patches dropped from the candidate set (STELLA's core_audio_ratio): 256 of 512 kept."""
    num_core_audio_times: int = 4
    """Time steps per audio chunk in STELLA's chunked audio selection."""
    att_temperature: float = 0.4
    """Temperature of the cross-modal attention importance."""
    alpha: float = 0.5
    """Weight of the DER-style MSE on the replayed clips' stored embeddings."""
    matching_loss_weight: float = 1.0
    """Weight of the AVM matching loss."""
    avm_init: str = ""
    """AVM weights the continual run starts from: the avm.safetensors of an AVM stage (``launch/avm.py``: the AVM
    trained with the backbone frozen, as the paper does) or an official STELLA / FLAVA checkpoint holding
    ``avmatching_module.*`` keys (with model.avm_layout=official). Empty: a random AVM, as STELLA's released
    commands run (they leave avm_pretrain_path empty)."""
    avm_epochs: int = 15
    """Epochs of the AVM stage (``launch/avm.py``) over the pre-training task (STELLA: 15 on AudioSet-20k)."""

    def validate(self) -> None:
        _positive(self, "num_core_audio_times", "att_temperature", "avm_epochs")
        _non_negative(self, "alpha", "matching_loss_weight")
        _fraction(self, "core_video_ratio", "core_audio_ratio", closed=False)


@dataclass(kw_only=True)
class ClassifyConfig:
    labels: Literal["single", "multi"] = "single"
    """'single': one class per clip, softmax cross-entropy, accuracy (VGGSound, CREMA-D); 'multi': multi-hot
    labels, binary cross-entropy, mAP (AudioSet). Every fine-tuning method reads it."""
    mode: Literal["multimodal", "audioonly", "videoonly"] = "multimodal"
    """linear_probe and cavmae_ft: CAV-MAE's fine-tuning mode, i.e. both modalities through the joint shared pass
    or one modality through the shared layers with its own LayerNorms."""
    head_lr_mult: float = 1.0
    """cavmae_ft: learning-rate multiplier of the head's parameter group (CAV-MAE: 100 / 50 / 10 for AS-20K /
    AS-2M / VGGSound); the backbone trains at train.lr."""
    multi_frame_eval: bool = False
    """Evaluate on all 10 frames of CAV-MAE's 1-fps grid, one at a time, and average the softmax (single) or
    sigmoid (multi) outputs (data.sampling=cavmae on shards; synthetic clips have no grid)."""
    test_windows: int = 1
    """data.sampling=stella: windows each test clip is scored on, starting every data.num_frames / 2 seconds from 0
    (STELLA's downstream test: 4 windows of 4 s at 0, 2, 4 and 6 s of a 10-s clip, clamped into shorter clips).
    Every window counts as one prediction in the accuracy or mAP, as in the official evaluation, which scores the
    windows as separate samples. The validation split keeps one window at data.eval_window_start. 1: the test
    split is read like the validation split."""
    select: Literal["val", "last"] = "val"
    """Which weights the test split measures: those of the epoch with the best validation score (needs
    data.val_fraction > 0) or of the last epoch. With weight averaging the average is tested instead."""
    average_from: int = 0
    """Weight averaging (CAV-MAE): first epoch (1-based) whose end-of-epoch weights enter an arithmetic mean of
    the parameters; 0 = off."""
    average_to: int = 0
    """Last epoch (1-based) of the weight average; 0 = the last epoch of the run."""

    def validate(self) -> None:
        _positive(self, "head_lr_mult", "test_windows")
        _non_negative(self, "average_from", "average_to")
        if self.average_to and self.average_to < self.average_from:
            _fail(self, "average_to", self.average_to, f"0 or >= method.classify.average_from ({self.average_from})")
        if self.average_to and not self.average_from:
            _fail(self, "average_from", 0, "the first averaged epoch (>= 1) when method.classify.average_to is set")


@dataclass(kw_only=True)
class MlaConfig:
    encoders: Literal["backbone", "resnet18"] = "backbone"
    """Encoders of mla, concat, ogm_ge and qmf: fastav's audio and video branches (model.*, weights from
    model.init), or a ResNet-18 pair trained from scratch (MLA's CREMA-D setup)."""
    resnet_width: int = 64
    """Channels of the ResNet-18 stem (64: the standard network, 512-d features); smaller for CPU runs."""
    fusion: Literal["entropy", "fixed"] = "entropy"
    """mla's test-time fusion reported as 'fused' and used for selection: per-sample entropy weights (the paper)
    or the fixed weights method.mla.fusion_weights. Both are always reported."""
    fusion_weights: tuple[float, ...] = (0.55, 0.45)
    """Audio and video weights of the fixed fusion (the official code's 0.55 / 0.45)."""
    projection: bool = True
    """The paper's head gradient modification (the official code's never runs); false trains alternating steps
    through the shared head only."""
    projection_alpha: float = 0.1
    """Base of alpha = projection_alpha ** (1 + i / N) in the projector update, i the batch in the epoch, N the
    batches per epoch."""
    normalize_projector: bool = True
    """Divide the projector by its Frobenius norm after each update (the official code's algorithm; OWM has no
    such step)."""

    def validate(self) -> None:
        _positive(self, "resnet_width", "projection_alpha")
        if len(self.fusion_weights) != 2 or any(w < 0 for w in self.fusion_weights):
            accepted = "two non-negative numbers (audio, video), e.g. 0.55,0.45"
            _fail(self, "fusion_weights", self.fusion_weights, accepted)


@dataclass(kw_only=True)
class OgmConfig:
    alpha: float = 0.3
    """OGM's modulation strength: the dominant modality's gradients are scaled by 1 - tanh(alpha * ratio)."""
    start_epoch: int = 0
    """First epoch (0-based) with modulation."""
    end_epoch: int = 50
    """Last epoch (0-based) with modulation."""
    noise: bool = True
    """Generalisation enhancement (OGM-GE): add N(0, std(g)) noise to the modulated gradients; false: plain OGM."""

    def validate(self) -> None:
        _non_negative(self, "alpha", "start_epoch", "end_epoch")


@dataclass(kw_only=True)
class QmfConfig:
    rank_weight: float = 0.1
    """Weight of QMF's confidence ranking loss per modality (the official ResNet path)."""
    energy_scale: float = 10.0
    """Confidence of a modality = logsumexp(logits) / energy_scale."""

    def validate(self) -> None:
        _non_negative(self, "rank_weight")
        _positive(self, "energy_scale")


CONTINUAL_METHODS = ("finetune", "multitask", "er", "derpp", "lump", "stella", "stella_plus")
"""Pre-training methods (``launch/pretrain.py``, ``launch/continual.py``); the replay ones keep a memory."""
REPLAY_METHODS = ("er", "derpp", "lump", "stella", "stella_plus")
FINETUNE_METHODS = ("linear_probe", "stella_probe", "cavmae_ft", "mla", "concat", "ogm_ge", "qmf")
"""Downstream fine-tuning methods (``launch/finetune.py``): classification probes and full fine-tuning, MLA and
the joint-training baselines it is compared with."""
METHODS = CONTINUAL_METHODS + FINETUNE_METHODS
"""Every ``method.name`` fastav implements."""


@dataclass(kw_only=True)
class MethodConfig:
    name: Literal[METHODS] = "finetune"  # type: ignore[valid-type]
    """What is trained: 'finetune' (MAE + InfoNCE on the current batch; plain pre-training, the continual lower
    bound), 'multitask' (the same on all tasks jointly, the upper bound), or a replay method: 'er', 'derpp', 'lump',
    'stella' (patch selection guided by the AVM, clips in memory), 'stella_plus' (selected patches in memory).
    Fine-tuning (launch/finetune.py): 'linear_probe', 'stella_probe', 'cavmae_ft', or 'mla' and its baselines
    'concat', 'ogm_ge', 'qmf'."""
    memory_size: int = 2000
    """Replay memory size over all ranks, divided evenly among them (reservoir sampling)."""
    derpp: DerppConfig = field(default_factory=DerppConfig)
    """DER++ settings."""
    lump: LumpConfig = field(default_factory=LumpConfig)
    """LUMP settings."""
    stella: StellaConfig = field(default_factory=StellaConfig)
    """STELLA settings."""
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    """Settings every fine-tuning method shares (launch/finetune.py: labels, selection, averaging, evaluation)."""
    mla: MlaConfig = field(default_factory=MlaConfig)
    """MLA settings; the encoder choice also serves its baselines concat, ogm_ge and qmf."""
    ogm: OgmConfig = field(default_factory=OgmConfig)
    """OGM-GE settings."""
    qmf: QmfConfig = field(default_factory=QmfConfig)
    """QMF settings."""

    def validate(self) -> None:
        _non_negative(self, "memory_size")
        if self.name in REPLAY_METHODS and self.memory_size == 0:
            _fail(self, "memory_size", 0, f"> 0 for method.name='{self.name}' (it replays from memory)")
        for sub in (self.derpp, self.lump, self.stella):
            sub.validate()
        for sub in (self.classify, self.mla, self.ogm, self.qmf):
            sub.validate()


@dataclass(kw_only=True)
class EvalConfig:
    retrieval_ks: tuple[int, ...] = (1, 5, 10)
    """K of the R@K retrieval metrics."""
    after_each_task: bool = True
    """Run zero-shot retrieval on the whole retrieval set after every task."""
    batch_size: int = 32
    """Clips per evaluation batch."""

    def validate(self) -> None:
        _positive(self, "batch_size")
        if not self.retrieval_ks or any(k <= 0 for k in self.retrieval_ks):
            _fail(self, "retrieval_ks", self.retrieval_ks, "one or more positive integers, e.g. 1,5,10")


@dataclass(kw_only=True)
class DistributedConfig:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0-3."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: nccl on GPUs, gloo on the CPU; 'auto' picks."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimizer states to host memory."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduction bucket (ZeRO-1/2). DeepSpeed allocates two such buckets during the backward,
    even on one process: at 5e8 (DeepSpeed's default) that is more memory than a 191 M-parameter model; 5e7 splits
    the model into a few buckets, which also lets the reduction overlap the backward."""
    timeout_minutes: int = 30
    """Timeout of collective operations (a rank waiting longer for the others fails instead of hanging)."""

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(self, "zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _positive(self, "reduce_bucket_size", "timeout_minutes")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "continual": ContinualConfig,
    "method": MethodConfig,
    "eval": EvalConfig,
    "distributed": DistributedConfig,
}


@dataclass(kw_only=True)
class Config:
    recipe: str = "base"
    """Name of the recipe this config was built from."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, *, require_data: bool = False) -> Config:
        """Check every section; with ``require_data`` also that the dataset directory exists."""
        for name in SECTIONS:
            getattr(self, name).validate()
        if require_data:
            root = self.data_root()
            if not root:
                raise ConfigError(
                    f"data.root: no dataset given; pass data.root=DIR (a directory written by "
                    f"'python -m shards ...') or set ${DATA_ENV}"
                )
            if not (Path(root) / "manifest.json").is_file():
                raise ConfigError(
                    f"data.root: {root!r} has no manifest.json; build it with 'python -m shards build' "
                    f"(or 'python -m shards synth' for generated data) or fix the path"
                )
        return self

    def data_root(self) -> str:
        return self.data.root or os.environ.get(DATA_ENV, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write the resolved config as ``config.json`` into ``run_dir`` (created if needed)."""
        path = Path(run_dir) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Rebuild a config from :meth:`to_dict` output, validating names and types."""
        cfg = Config(recipe=str(raw.get("recipe", "base")))
        for key in raw:
            if key != "recipe" and key not in SECTIONS:
                raise ConfigError(_unknown("section", key, list(SECTIONS)))
        for name in SECTIONS:
            for dotted, value in _flatten(raw.get(name, {}), name):
                _set_field(cfg, dotted, value, from_text=False)
        return cfg.validate()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def deepspeed_config(self, world_size: int = 1) -> dict[str, Any]:
        """The DeepSpeed JSON for this run: batch sizes, ZeRO, precision and clipping.

        The optimizer and schedule are built by fastav (parameter groups without weight decay on norms
        and embeddings) and handed to ``deepspeed.initialize``, so they are not in the JSON.
        """
        micro = self.data.batch_size
        zero: dict[str, Any] = {
            "stage": self.distributed.zero_stage,
            "overlap_comm": self.distributed.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": self.distributed.reduce_bucket_size,
        }
        if self.distributed.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        return {
            "train_batch_size": micro * self.train.grad_accum * world_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": self.train.grad_accum,
            "gradient_clipping": self.train.grad_clip,
            "bf16": {"enabled": self.train.precision == "bf16"},
            "zero_optimization": zero,
            # DeepSpeed's list of ZeRO-tested optimizers has torch's Adam and AdamW but not SGD; torch's SGD on
            # ZeRO's flat fp32 partitions is an ordinary elementwise update
            "zero_allow_untested_optimizer": self.train.optimizer == "sgd",
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }


# ---------------------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------------------


def base() -> Config:
    """STELLA-sized defaults (ViT-B, 10+2 layers, 4 frames); every recipe starts here."""
    return Config()


def debug() -> Config:
    """A CPU-size STELLA model on the synthetic dataset: trains in seconds per task on 2 cores."""
    cfg = base()
    cfg.recipe = "debug"
    cfg.data = dataclasses.replace(
        cfg.data, batch_size=8, frame_size=64, target_length=256, num_mel_bins=64, eval_window_start=0.0
    )
    cfg.model = dataclasses.replace(
        cfg.model,
        embed_dim=64,
        num_heads=4,
        specific_depth=2,
        shared_depth=1,
        decoder_dim=48,
        decoder_depth=1,
        decoder_heads=4,
    )
    cfg.train = dataclasses.replace(cfg.train, precision="fp32", epochs=2, log_every=5, tensorboard=False)
    cfg.continual = dataclasses.replace(cfg.continual, epochs_per_task=1)
    cfg.method = dataclasses.replace(cfg.method, memory_size=64)
    cfg.eval = dataclasses.replace(cfg.eval, batch_size=16)
    cfg.distributed = dataclasses.replace(cfg.distributed, zero_stage=0)
    return cfg


def cavmae_base() -> Config:
    """CAV-MAE-Base pre-training on AudioSet-2M (docs/methods/cav_mae.md): 11+1 layers, 1 frame, batch 4x12."""
    cfg = base()
    cfg.recipe = "cavmae_base"
    cfg.data = dataclasses.replace(cfg.data, sampling="cavmae", num_frames=1)
    cfg.model = dataclasses.replace(
        cfg.model,
        arch="cavmae",
        specific_depth=11,
        shared_depth=1,
        mask_ratio_a=0.75,
        mask_ratio_v=0.75,
        pos_embed="fixed",
        inter_pos_embed=False,
        shared_mask_token=True,
        contrastive_weight=0.01,
        bidirectional_contrastive=False,
        avm=False,
        tagged_norms="all",
        decoder_joint=True,
        gather_negatives=False,
    )
    cfg.train = dataclasses.replace(
        cfg.train, lr=5e-5, schedule="multistep", milestones=(10, 15, 20, 25), gamma=0.5, epochs=25
    )
    return cfg


DEBUG_SIZES = (
    "embed_dim",
    "num_heads",
    "specific_depth",
    "shared_depth",
    "decoder_dim",
    "decoder_depth",
    "decoder_heads",
)
"""The model fields a CPU-size recipe shrinks; everything else comes from the full-size recipe it mirrors."""


def debug_cavmae() -> Config:
    """CAV-MAE's layout and objective (``cavmae_base``: 1 frame, shared mask token, fixed positions, lambda_c 0.01,
    75 % masking) at the ``debug`` sizes and training settings."""
    cfg = debug()
    cfg.recipe = "debug_cavmae"
    small = {name: getattr(cfg.model, name) for name in DEBUG_SIZES}
    cfg.model = dataclasses.replace(cavmae_base().model, **small)
    cfg.data = dataclasses.replace(cfg.data, sampling="cavmae", num_frames=1)
    return cfg


def debug_scratch() -> Config:
    """``debug`` for a randomly initialised model (no released or ImageNet weights), the first stage of the demo:
    the InfoNCE gradient reaches every rank (gather_grad), weight 1.0 and temperature 0.2 move the pooled features
    apart instead of first pulling them together, lr 3e-4, 24 epochs (312 steps of 2 x 8 default synthetic clips)."""
    cfg = debug()
    cfg.recipe = "debug_scratch"
    cfg.model = dataclasses.replace(cfg.model, gather_grad=True, contrastive_weight=1.0, contrastive_tau=0.2)
    cfg.train = dataclasses.replace(cfg.train, lr=3e-4, epochs=24)
    return cfg


def demo_pretrain() -> Config:
    """``make demo``'s pre-training: ``debug_scratch`` on the synthetic dataset's pre-training classes, checkpoints
    at the end only."""
    cfg = debug_scratch()
    cfg.recipe = "demo_pretrain"
    cfg.train = dataclasses.replace(cfg.train, checkpoint_every=10**6, keep_checkpoints=1)
    return cfg


def demo() -> Config:
    """``make demo``'s continual runs: the debug-size model with ``debug_scratch``'s objective (the start is a short
    from-scratch pre-training, not released weights), 12 epochs per task, a memory of 2 x 64 clips, STELLA's AVM
    pre-trained for 4 epochs."""
    cfg = debug_scratch()
    cfg.recipe = "demo"
    cfg.continual = dataclasses.replace(cfg.continual, epochs_per_task=12)
    cfg.method = dataclasses.replace(
        cfg.method, memory_size=128, stella=dataclasses.replace(cfg.method.stella, avm_epochs=4)
    )
    cfg.train = dataclasses.replace(cfg.train, checkpoint_every=10**6, keep_checkpoints=1)
    return cfg


def stella_vggsound() -> Config:
    """STELLA continual pre-training on the VGGSound 8-task sequence (docs/methods/stella.md)."""
    cfg = base()
    cfg.recipe = "stella_vggsound"
    cfg.method = dataclasses.replace(cfg.method, name="stella")
    cfg.continual = dataclasses.replace(
        cfg.continual,
        task_order=("sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2"),
        epochs_per_task=10,
    )
    return cfg


def stella_audioset() -> Config:
    """STELLA continual pre-training on the AudioSet 7-task sequence (docs/methods/stella.md): batch 9 per GPU."""
    cfg = base()
    cfg.recipe = "stella_audioset"
    cfg.method = dataclasses.replace(cfg.method, name="stella")
    cfg.data = dataclasses.replace(cfg.data, batch_size=9)
    cfg.continual = dataclasses.replace(
        cfg.continual,
        task_order=("human", "vehicle", "nature", "animal", "others", "home", "music"),
        epochs_per_task=15,
    )
    return cfg


def debug_finetune() -> Config:
    """Fine-tuning at the debug sizes on a CPU (launch/finetune.py): a linear probe unless method.name says
    otherwise, a fifth of the training clips held out for validation, a few epochs."""
    cfg = debug()
    cfg.recipe = "debug_finetune"
    cfg.data = dataclasses.replace(cfg.data, val_fraction=0.2)
    cfg.train = dataclasses.replace(cfg.train, lr=1e-3, epochs=4)
    cfg.method = dataclasses.replace(cfg.method, name="linear_probe")
    return cfg


def debug_mla() -> Config:
    """MLA on a CPU (method.name=concat, ogm_ge or qmf for its baselines): a ResNet-18 pair at a quarter of the
    width (method.mla.encoders=backbone for the debug-size fastav branches, from model.init), SGD with momentum 0.9
    and weight decay 1e-4 at a CPU-run learning rate, 10 epochs, on synthetic clips whose video is the weak
    modality (data.source=synthetic)."""
    cfg = debug_finetune()
    cfg.recipe = "debug_mla"
    cfg.data = dataclasses.replace(cfg.data, synthetic_weak_modality="video", synthetic_noise=0.5)
    cfg.train = dataclasses.replace(cfg.train, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=10)
    cfg.method = dataclasses.replace(cfg.method, name="mla")
    cfg.method.mla = dataclasses.replace(cfg.method.mla, encoders="resnet18", resnet_width=16)
    return cfg


def mla_cremad() -> Config:
    """MLA on CREMA-D as the paper (docs/methods/mla.md): a ResNet-18 pair from scratch, 3 frames 1 s apart at 224 px,
    SGD lr 1e-3, momentum 0.9, weight decay 1e-4, lr x0.1 at epoch 70, 100 epochs, batch 64 on one GPU, fp32; a
    tenth of the training clips held out for selection (the official code selects on test)."""
    cfg = base()
    cfg.recipe = "mla_cremad"
    cfg.data = dataclasses.replace(
        cfg.data, batch_size=64, num_frames=3, eval_window_start=0.0, noise=False, val_fraction=0.1
    )
    cfg.train = dataclasses.replace(
        cfg.train, optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, schedule="multistep",
        milestones=(70,), gamma=0.1, epochs=100, precision="fp32",
    )  # fmt: skip
    cfg.method = dataclasses.replace(cfg.method, name="mla")
    cfg.method.mla = dataclasses.replace(cfg.method.mla, encoders="resnet18")
    return cfg


def mla_cavmae_cremad() -> Config:
    """MLA on CREMA-D with fastav's CAV-MAE audio and video branches (768-d, one shared head as the paper's
    transformer setups) instead of the ResNet-18 pair: model.init names a CAV-MAE checkpoint; CAV-MAE's one frame
    at 224 px; the optimiser and schedule of mla_cremad."""
    cfg = mla_cremad()
    cfg.recipe = "mla_cavmae_cremad"
    cfg.model = cavmae_base().model
    cfg.data = dataclasses.replace(cfg.data, sampling="cavmae", num_frames=1)
    cfg.method.mla = dataclasses.replace(cfg.method.mla, encoders="backbone")
    return cfg


def stella_probe_vggsound() -> Config:
    """STELLA's downstream VGGSound classification (docs/methods/stella.md): its MLP head on the frozen backbone,
    AdamW 5e-4, betas (0.95, 0.999), weight decay 5e-6, 2 warm-up epochs then cosine, 15 epochs, batch 12 x 4 GPUs,
    SpecAugment 48 / 192 and noise, test clips scored on 4 windows (0, 2, 4, 6 s); model.init names the continual
    checkpoint."""
    cfg = stella_vggsound()
    cfg.recipe = "stella_probe_vggsound"
    cfg.data = dataclasses.replace(cfg.data, specaug_freq=48, specaug_time=192, val_fraction=0.1)
    cfg.train = dataclasses.replace(
        cfg.train, optimizer="adamw", lr=5e-4, weight_decay=5e-6, schedule="cosine", warmup_epochs=2.0, epochs=15
    )
    cfg.method = dataclasses.replace(cfg.method, name="stella_probe")
    cfg.method.classify = dataclasses.replace(cfg.method.classify, test_windows=4)
    return cfg


def cavmae_ft_vggsound() -> Config:
    """CAV-MAE's VGGSound fine-tuning (docs/methods/cav_mae.md): lr 1e-4 with the head at x10, lr halved every epoch
    from the third, 10 epochs, batch 12 x 4 GPUs, SpecAugment 48 / 192, mixup 0.5, label smoothing 0.1, class-balanced
    sampling, weights averaged over epochs 3-10, predictions averaged over 10 frames."""
    cfg = cavmae_base()
    cfg.recipe = "cavmae_ft_vggsound"
    cfg.data = dataclasses.replace(
        cfg.data, specaug_freq=48, specaug_time=192, mixup=0.5, label_smoothing=0.1, val_fraction=0.1, balanced=True
    )
    cfg.train = dataclasses.replace(cfg.train, lr=1e-4, milestones=tuple(range(2, 10)), epochs=10)
    cfg.method = dataclasses.replace(cfg.method, name="cavmae_ft")
    cfg.method.classify = dataclasses.replace(
        cfg.method.classify, head_lr_mult=10.0, multi_frame_eval=True, average_from=3, average_to=10
    )
    return cfg


def cavmae_ft_as20k() -> Config:
    """CAV-MAE's AudioSet-20K fine-tuning (docs/methods/cav_mae.md): multi-label (BCE, mAP), lr 5e-5 with the head at
    x100, halved every epoch from the sixth, 15 epochs, batch 9 x 4 GPUs, weights averaged over epochs 3-15, no
    class-balanced sampling (the official AudioSet-2M run samples balanced: data.balanced=true)."""
    cfg = cavmae_ft_vggsound()
    cfg.recipe = "cavmae_ft_as20k"
    cfg.data = dataclasses.replace(cfg.data, batch_size=9, balanced=False)  # AS-20K: the official run is unbalanced
    cfg.train = dataclasses.replace(cfg.train, lr=5e-5, milestones=tuple(range(5, 15)), epochs=15)
    cfg.method.classify = dataclasses.replace(
        cfg.method.classify, labels="multi", head_lr_mult=100.0, average_from=3, average_to=15
    )
    return cfg


RECIPES: dict[str, Callable[[], Config]] = {
    "base": base,
    "debug": debug,
    "debug_cavmae": debug_cavmae,
    "debug_scratch": debug_scratch,
    "demo_pretrain": demo_pretrain,
    "demo": demo,
    "cavmae_base": cavmae_base,
    "stella_vggsound": stella_vggsound,
    "stella_audioset": stella_audioset,
    "debug_finetune": debug_finetune,
    "debug_mla": debug_mla,
    "mla_cremad": mla_cremad,
    "mla_cavmae_cremad": mla_cavmae_cremad,
    "stella_probe_vggsound": stella_probe_vggsound,
    "cavmae_ft_vggsound": cavmae_ft_vggsound,
    "cavmae_ft_as20k": cavmae_ft_as20k,
}


def load_config(recipe: str = "debug", overrides: Iterable[str] = ()) -> Config:
    """Build a named recipe, apply ``section.field=value`` overrides and validate the result."""
    if recipe not in RECIPES:
        raise ConfigError(_unknown("recipe", recipe, list(RECIPES)))
    cfg = RECIPES[recipe]()
    apply_overrides(cfg, overrides)
    return cfg.validate()


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``section.field=value`` strings in order (later ones win); values are parsed by field type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.lr=1e-4")
        dotted, text = item.split("=", 1)
        _set_field(cfg, dotted.strip(), text.strip(), from_text=True)
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and validation helpers
# ---------------------------------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _set_field(cfg: Config, dotted: str, value: Any, *, from_text: bool) -> None:
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {dotted!r}: expected section.field, e.g. train.lr or method.stella.alpha")
    if parts[0] not in SECTIONS:
        raise ConfigError(_unknown("section", parts[0], list(SECTIONS)))
    obj: Any = cfg
    for depth, key in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            where = ".".join(parts[:depth])
            raise ConfigError(f"override {dotted!r}: {where} is a value, not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        where = ".".join(parts[:depth])
        if key not in names:
            what = "section" if depth == 0 else f"field of '{where}'"
            raise ConfigError(_unknown(what, key, names, prefix=f"{where}." if where else ""))
        if depth == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[key]
            if dataclasses.is_dataclass(tp):
                fields = ", ".join(f"{dotted}.{f.name}" for f in dataclasses.fields(tp))
                raise ConfigError(f"override {dotted!r}: a section, not a value; set its fields: {fields}")
            setattr(obj, key, _convert(dotted, tp, value, from_text))
        else:
            obj = getattr(obj, key)


def _flatten(raw: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` under ``prefix`` as ``("prefix.a.b", 1)`` pairs (nested sections of a saved config)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a section (a JSON object), got {raw!r}")
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def _convert(name: str, tp: Any, value: Any, from_text: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not accepted; choose one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if from_text:
            items = [v.strip() for v in str(value).split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_convert(name, item_tp, v, from_text) for v in items)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        return _convert(name, args[0], value, from_text)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (not from_text and not isinstance(value, int)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(str(value)) if from_text else value
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not from_text and not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{name}: unsupported field type {tp!r}")  # a programming error in this module


def _unknown(what: str, got: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(got, valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"unknown {what} {got!r}{hint}; valid: {', '.join(prefix + v for v in valid)}"


def _section_paths() -> dict[type, str]:
    """Every section class (nested ones included) and its dotted path in :class:`Config`."""
    paths: dict[type, str] = {}

    def walk(cls: type, path: str) -> None:
        paths[cls] = path
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.{f.name}")

    for name, cls in SECTIONS.items():
        walk(cls, name)
    return paths


def _section_name(obj: Any) -> str:
    return _section_paths()[type(obj)]


def _fail(obj: Any, key: str, value: Any, accepted: str) -> typing.NoReturn:
    raise ConfigError(f"{_section_name(obj)}.{key}: got {value!r}; accepted: {accepted}")


def _positive(obj: Any, *keys: str) -> None:
    for key in keys:
        if not getattr(obj, key) > 0:
            _fail(obj, key, getattr(obj, key), "a value > 0")


def _non_negative(obj: Any, *keys: str) -> None:
    for key in keys:
        if not getattr(obj, key) >= 0:
            _fail(obj, key, getattr(obj, key), "a value >= 0")


def _fraction(obj: Any, *keys: str, closed: bool) -> None:
    for key in keys:
        value = getattr(obj, key)
        ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
        if not ok:
            _fail(obj, key, value, "a fraction in [0, 1]" if closed else "a fraction in [0, 1)")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def explain(cfg: Config) -> str:
    """One line per field: dotted name, current value, docstring (nested sections after their parent's fields)."""
    lines = [f"recipe: {cfg.recipe}"]

    def section(obj: Any, path: str) -> None:
        docs = field_docs(type(obj))
        lines.append(f"\n[{path}]")
        nested = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((value, f"{path}.{f.name}"))
                continue
            lines.append(f"  {path}.{f.name} = {value!r}\n      {docs.get(f.name, '')}")
        for value, sub in nested:
            section(value, sub)

    for name in SECTIONS:
        section(getattr(cfg, name), name)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastav.config {show,explain,deepspeed} [--recipe NAME] [section.field=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastav.config", description=main.__doc__)
    parser.add_argument("command", choices=["show", "explain", "deepspeed"])
    parser.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "show":
        print(cfg.to_json())
    elif args.command == "deepspeed":
        print(json.dumps(cfg.deepspeed_config(), indent=2))
    else:
        print(explain(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
