"""Training methods over the audio-video MAE: the plain objective and the continual baselines STELLA is compared with.

Every method is a small :class:`~fastav.train.method.Method` over the same model
(:class:`fastav.models.AVMAE`: MAE reconstruction + InfoNCE) and the same trainer; ``method.name`` picks one:

- ``finetune``: the plain MAE + contrastive objective on the current batch. This is also plain pre-training
  (``launch/pretrain.py`` trains it over one stage), and the lower bound of a continual run.
- ``multitask``: the same step; the continual runner gives it all tasks' training data jointly for
  ``continual.epochs_per_task`` epochs (the upper bound): a data choice, not a different step.
- ``er``: a replay draw of min(B, filled) clips concatenated to the current batch; the current clips (as trained
  on, augmentation included) go into the memory after the step.
- ``derpp``: ER plus ``method.derpp.alpha`` x (MSE(stored, current) of the mean-pooled audio embedding + the
  same for video) on the replayed clips, as STELLA's baseline code runs DER++: the stored embeddings are those of
  the step that inserted the clip (its masks), the current ones come from this step's forward over the
  concatenated batch.
- ``lump``: one lambda ~ Beta(a, a) per batch (``method.lump.mix_alpha``) mixes the current clips with a replay
  draw, inputs and fbanks alike, and the step trains on the mixed batch only; the unmixed current clips go into
  the memory.

Task-free: no method reads the task id. The memory (:class:`~fastav.continual.memory.ReplayMemory`) lives on the
training device, one per rank, and is saved in the rank's checkpoint file. A new method subclasses
:class:`AVMethod` (or :class:`ReplayMethod`), implements ``forward`` (and ``after_step``), and is registered in
:data:`METHODS`; MIR, GMED, CLS-ER and ESMER would go there.

Shape suffixes: B current clips, R replayed clips, D embedding width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fastav.config import Config
from fastav.continual.memory import Field, ReplayMemory, clip_fields
from fastav.models import AVMAE, PretrainOutput
from fastav.train.method import Method, StepOutput


class AVMethod(Method):
    """A method over :class:`fastav.models.AVMAE`: input casting and the objective's loss terms."""

    def __init__(self, cfg: Config, model: AVMAE) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(fbank, video)`` of the batch in the model's dtype."""
        dtype = self.input_dtype()
        return batch["fbank"].to(dtype), batch["video"].to(dtype)

    @staticmethod
    def terms(out: PretrainOutput, **extra: Tensor) -> dict[str, Tensor]:
        return {**out.metrics(), **{k: v.detach() for k, v in extra.items()}}


class Finetune(AVMethod):
    """MAE + InfoNCE on the current batch."""

    name: ClassVar[str] = "finetune"

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        out = self.model(*self.inputs(batch))
        return StepOutput(out.loss, self.terms(out))


class Multitask(Finetune):
    """Finetune's step; the runner gives it every task's data at once."""

    name: ClassVar[str] = "multitask"


class ReplayMethod(AVMethod):
    """A method with a replay memory of ``method.memory_size / world_size`` clips on this rank."""

    extra_fields: ClassVar[dict[str, str]] = {}
    """Stored per clip besides the clip itself: field name -> 'embedding' (a (D,) fp32 vector)."""
    memory_layout: ClassVar[str] = "uint8 frames, bf16 fbank"
    """How an entry is stored, for the start-up line."""

    def __init__(self, cfg: Config, model: AVMAE, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(cfg, model)
        self.capacity = cfg.method.memory_size // world_size
        self.memory_seed = cfg.train.seed * 1_000_003 + 7919 * rank + 17
        if self.capacity < cfg.data.batch_size:
            raise ValueError(
                f"method.memory_size={cfg.method.memory_size} gives {self.capacity} clips per process over "
                f"{world_size} process(es), fewer than one batch (data.batch_size={cfg.data.batch_size}); raise "
                f"method.memory_size"
            )
        self._memory: ReplayMemory | None = None

    def memory_fields(self) -> dict[str, Field]:
        d, dim = self.cfg.data, self.cfg.model.embed_dim
        fields = clip_fields(d.num_frames, d.frame_size, d.target_length, d.num_mel_bins)
        fields.update({name: Field((dim,), torch.float32) for name in self.extra_fields})
        return fields

    def bytes_per_clip(self) -> int:
        """Storage of one memory entry (what the start-up line reports)."""
        return sum(torch.empty((), dtype=f.dtype).element_size() * int(torch.Size(f.shape).numel())
                   for f in self.memory_fields().values())  # fmt: skip

    @property
    def memory(self) -> ReplayMemory:
        if self._memory is None:
            device = next(self.model.parameters()).device
            self._memory = ReplayMemory(self.capacity, self.memory_fields(), device=device, seed=self.memory_seed)
        return self._memory

    def replay(self, batch_size: int) -> dict[str, Tensor] | None:
        """A draw of min(B, filled) clips in the model's dtype, or None while the memory is empty."""
        count = min(batch_size, self.memory.filled)
        return self.memory.draw(count, dtype=self.input_dtype()) if count else None

    def store(self, batch: Mapping[str, Tensor], **extra: Tensor) -> None:
        """Offer the current clips (as trained on) and their extra fields to the memory."""
        self.memory.insert({"video": batch["video"], "fbank": batch["fbank"], **extra})

    def after_step(self, batch: Mapping[str, Tensor], out: StepOutput) -> None:
        self.store(batch, **{name: out.extras[name] for name in self.extra_fields})

    def gauges(self) -> dict[str, Tensor | float]:
        return {"memory_fill": self.memory.filled / self.capacity}  # a host number: no device read

    def rank_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_rank_state(self, state: Mapping[str, Any]) -> None:
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])


class ER(ReplayMethod):
    """Experience replay: current batch + a replay draw, one objective."""

    name: ClassVar[str] = "er"

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank_B, video_B = self.inputs(batch)
        draw = self.replay(fbank_B.shape[0])
        if draw is not None:
            fbank_B = torch.cat([fbank_B, draw["fbank"]])
            video_B = torch.cat([video_B, draw["video"]])
        out = self.model(fbank_B, video_B)
        return StepOutput(out.loss, self.terms(out))


class DERpp(ReplayMethod):
    """DER++ as STELLA's baseline: ER plus alpha x MSE between stored and current pooled embeddings of replays."""

    name: ClassVar[str] = "derpp"
    extra_fields: ClassVar[dict[str, str]] = {"pooled_a": "embedding", "pooled_v": "embedding"}

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank, video = self.inputs(batch)
        B = fbank.shape[0]
        draw = self.replay(B)
        if draw is None:
            out = self.model(fbank, video)
            penalty = out.loss.new_zeros(())
        else:
            out = self.model(torch.cat([fbank, draw["fbank"]]), torch.cat([video, draw["video"]]))
            mse_a = F.mse_loss(out.pooled_a_BD[B:].float(), draw["pooled_a"].float())
            mse_v = F.mse_loss(out.pooled_v_BD[B:].float(), draw["pooled_v"].float())
            penalty = self.cfg.method.derpp.alpha * (mse_a + mse_v)
        loss = out.loss + penalty
        extras = {"pooled_a": out.pooled_a_BD[:B].detach().float(), "pooled_v": out.pooled_v_BD[:B].detach().float()}
        return StepOutput(loss, {**self.terms(out, loss_der=penalty), "loss": loss.detach()}, extras)


class LUMP(ReplayMethod):
    """LUMP: mixup of the current batch with a replay draw (one Beta(a, a) lambda per batch); trains on the mix."""

    name: ClassVar[str] = "lump"

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        fbank, video = self.inputs(batch)
        draw = self.replay(fbank.shape[0])
        if draw is None:
            out = self.model(fbank, video)
            return StepOutput(out.loss, self.terms(out))
        a = torch.full((), self.cfg.method.lump.mix_alpha, device=fbank.device)
        lam = torch.distributions.Beta(a, a, validate_args=False).sample()  # device RNG; validation would sync
        mix = lam.to(fbank.dtype)
        out = self.model(mix * fbank + (1 - mix) * draw["fbank"], mix * video + (1 - mix) * draw["video"])
        return StepOutput(out.loss, self.terms(out, lump_lambda=lam))


from fastav.continual.stella import STELLA_METHODS  # noqa: E402 (its classes build on ReplayMethod above)

METHODS: dict[str, type[AVMethod]] = {m.name: m for m in (Finetune, Multitask, ER, DERpp, LUMP, *STELLA_METHODS)}
"""``method.name`` -> class."""
