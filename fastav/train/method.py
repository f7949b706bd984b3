"""The contract between the trainer and what it trains: a :class:`Method` module and its :class:`StepOutput`.

The trainer (:mod:`fastav.train.trainer`) and the engine (:mod:`fastav.train.engine`) know nothing of batch keys,
model signatures, replay or extra losses: a method owns all of that. A method is an ``nn.Module`` whose

- ``forward(batch) -> StepOutput`` computes the loss to back-propagate and its named terms (detached scalars,
  left on the device: the trainer reads them back only on logging steps);
- ``after_step(batch, out)`` runs after the optimizer step, outside autograd (a replay-memory insert), and must
  read nothing back to the host;
- ``on_stage_start`` / ``on_stage_end`` bracket each stage (a continual task, or the one stage of pre-training);
- ``rank_state`` / ``load_rank_state`` carry what differs per rank (a replay memory): the checkpoint stores one
  file per rank, so every rank resumes with its own;
- ``gauges()`` returns extra device scalars to log (memory fill, say);
- ``embed_clips(fbank, video)`` gives L2-normalised retrieval embeddings for :mod:`fastav.eval`.

Parameters that the method owns (model, AVM, heads) are registered submodules; buffers that must not be
averaged or partitioned by DeepSpeed (a replay memory) are plain attributes saved through ``rank_state``.

A method that needs its own backward and optimizer calls within one batch (MLA: one per modality) sets
``manual_steps = True`` and implements ``manual_step(batch, engine)``; the engine then hands it ``backward``
and ``step`` (see :meth:`fastav.train.engine.Engine.train_step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fastav.train.engine import Engine


@dataclass
class StepOutput:
    """What one training forward pass returns."""

    loss: Tensor
    """Scalar to back-propagate (the plain sum of the weighted terms)."""
    terms: dict[str, Tensor] = field(default_factory=dict)
    """Named scalars to log (loss terms before or after their weights, accuracies), detached, on the device."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Detached tensors the method's ``after_step`` needs from the forward pass (embeddings to store, say)."""


@dataclass(frozen=True)
class Stage:
    """One stretch of training with one data source: the single stage of pre-training, or one continual task."""

    index: int
    """Position in the run's stage list."""
    name: str
    """'pretrain', a task name, or 'multitask'."""
    epochs: int
    """Epochs over the stage's training data."""
    tasks: tuple[str, ...] = ()
    """Dataset tasks read in this stage (all of them when empty)."""
    keep_checkpoint: bool = True
    """Pin the checkpoint written at the stage's end (never pruned by train.keep_checkpoints); False for stages
    as short as one fine-tuning epoch, whose end checkpoints are then pruned like step checkpoints."""
    loader_continues: bool = False
    """The next stage reads on from this stage's loader (``make_loader`` returns a view of the same one, as
    fine-tuning's one-epoch stages do), so the checkpoint at this stage's end stores the loader's position and a
    run resumed there continues with the batches it would have seen. False: the next stage starts a new loader (a
    continual task)."""


class Method(nn.Module):
    """Base class of every training method; see the module docstring for the hooks.

    A subclass sets ``self.model``: the module whose weights the run exports as ``weights.safetensors`` (the
    backbone), and returns any other exported module from :meth:`extra_weights`.
    """

    name: ClassVar[str] = "method"
    manual_steps: ClassVar[bool] = False
    """True: the engine calls :meth:`manual_step` instead of forward / backward / step."""
    model: nn.Module

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> StepOutput")

    def manual_step(self, batch: Mapping[str, Tensor], engine: Engine) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} sets manual_steps but has no manual_step(batch, engine)")

    def after_step(self, batch: Mapping[str, Tensor], out: StepOutput) -> None:
        """After the optimizer step (no autograd, no host read): a memory update, say."""

    def on_stage_start(self, stage: Stage) -> None:
        """Before the first batch of a stage."""

    def on_stage_end(self, stage: Stage) -> None:
        """After the last batch of a stage (before its evaluation and checkpoint)."""

    def gauges(self) -> dict[str, Tensor | float]:
        """Extra values logged with the loss terms: device scalars (read back on logging steps only) or host
        numbers."""
        return {}

    def rank_state(self) -> dict[str, Any]:
        """State that differs per rank (a replay memory), saved in this rank's checkpoint file."""
        return {}

    def load_rank_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`rank_state`."""

    def extra_weights(self) -> dict[str, nn.Module]:
        """Modules exported beside the model at the end of a run, as ``<name>.safetensors`` (STELLA's AVM, say)."""
        return {}

    def input_dtype(self) -> torch.dtype:
        """The dtype the model's parameters have (bf16 under DeepSpeed's bf16 mode): inputs are cast to it."""
        for param in self.model.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    def embed_clips(self, fbank: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised retrieval embeddings of full clips, from the model's unimodal path."""
        return self.model.embed_clips(fbank, video)
