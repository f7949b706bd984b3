"""In-memory synthetic clips in the batch contract, for tests and for trying the trainer without shards.

Every sample ``i`` of a dataset of ``num_samples`` is a fixed function of ``(seed, i)``: a class ``c = i % C``
and two latent numbers ``u0, u1`` in [0, 1) that both modalities show, so audio and video of one clip match and
retrieval between them can be learnt beyond the class level:

- video: a square whose colour is the class's, at a position set by ``(u0, u1)``, drifting with a class-specific
  velocity over the frames, on a noisy background;
- audio: a band of mel bins centred at a bin set by ``u0``, pulsing with a class-specific period from a phase set
  by ``u1``, on noise.

An epoch is a permutation of the samples seeded by ``(seed, epoch)``, split over ranks (equal parts, the
remainder dropped) and read in batches of ``batch_size``. The loader follows :class:`fastav.data.AVLoader`'s
protocol: ``for batch in loader`` yields the rest of the current epoch, ``len(loader)`` is the batches per epoch,
``epoch`` the current epoch, and ``state_dict()`` / ``load_state_dict()`` hold the position, so a resumed run
reads exactly the batches an uninterrupted one would.

Shape suffixes: B batch, T frames (video) or fbank frames (audio), F mel bins, H/W pixels, C classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fastav.config import Config


class SyntheticAV:
    def __init__(
        self,
        cfg: Config,
        *,
        num_samples: int = 256,
        num_classes: int = 8,
        num_tasks: int = 1,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        device: torch.device | str = "cpu",
        offset: int = 0,
    ) -> None:
        """``offset`` shifts the sample ids (a held-out set: ``offset=num_samples`` of the training set)."""
        self.frames, self.size = cfg.data.num_frames, cfg.data.frame_size
        self.time, self.mels = cfg.data.target_length, cfg.data.num_mel_bins
        self.dtype = torch.bfloat16 if cfg.data.dtype == "bfloat16" else torch.float32
        self.num_samples, self.num_classes, self.num_tasks = num_samples, num_classes, num_tasks
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size or cfg.data.batch_size
        self.shuffle = shuffle
        self.seed = cfg.train.seed if seed is None else seed
        self.device = torch.device(device)
        self.offset = offset
        self.per_rank = num_samples // world_size
        if self.per_rank < self.batch_size:
            raise ValueError(
                f"synthetic dataset: {num_samples} samples give {self.per_rank} per rank, fewer than one batch of "
                f"{self.batch_size}; use more samples or a smaller data.batch_size"
            )
        self._epoch = 0
        self._batch = 0

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def order(self, epoch: int) -> Tensor:
        """This rank's sample ids of ``epoch``, in reading order."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=gen)
        else:
            perm = torch.arange(self.num_samples)
        return perm[self.rank :: self.world_size][: self.per_rank] + self.offset

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        ids = self.order(self._epoch)
        while self._batch < len(self):
            start = self._batch * self.batch_size
            self._batch += 1  # the position counts the batch as read before it is handed out
            yield self.batch(ids[start : start + self.batch_size])
        self._epoch += 1
        self._batch = 0

    def batch(self, ids_B: Tensor) -> dict[str, Tensor]:
        """The batch-contract dict of the given sample ids."""
        samples = [self.sample(int(i)) for i in ids_B]
        video = torch.stack([s[0] for s in samples])
        fbank = torch.stack([s[1] for s in samples])
        cls_B = ids_B % self.num_classes
        labels = torch.nn.functional.one_hot(cls_B, self.num_classes).float()
        task = cls_B * self.num_tasks // self.num_classes
        return {
            "video": video.to(self.device, self.dtype),
            "fbank": fbank.to(self.device, self.dtype),
            "labels": labels.to(self.device),
            "task": task.to(self.device),
            "index": ids_B.to(self.device, torch.int64),
        }

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        """(video (T, 3, H, W), fbank (T, F)) of sample ``i``; a fixed function of ``(seed, i)``."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + i * 104_729 + 17)
        c = i % self.num_classes
        u0, u1 = torch.rand(2, generator=gen, dtype=torch.float64).tolist()  # sync-ok: CPU generator, test data
        class_gen = torch.Generator().manual_seed(self.seed * 31 + c)
        colour = torch.rand(3, generator=class_gen) * 4 - 2
        velocity = (torch.rand(2, generator=class_gen) - 0.5) * 0.2
        period = 4 + int(torch.randint(0, 12, (1,), generator=class_gen))
        return self._video(gen, u0, u1, colour, velocity), self._audio(gen, u0, u1, period)

    def _video(self, gen: torch.Generator, u0: float, u1: float, colour: Tensor, velocity: Tensor) -> Tensor:
        S, T = self.size, self.frames
        side = max(S // 4, 2)
        video_TCHW = torch.randn(T, 3, S, S, generator=gen) * 0.3
        for t in range(T):
            x = min(max(u0 + float(velocity[0]) * t, 0.0), 1.0)
            y = min(max(u1 + float(velocity[1]) * t, 0.0), 1.0)
            top, left = int(y * (S - side)), int(x * (S - side))
            video_TCHW[t, :, top : top + side, left : left + side] += colour[:, None, None]
        return video_TCHW

    def _audio(self, gen: torch.Generator, u0: float, u1: float, period: int) -> Tensor:
        T, F = self.time, self.mels
        fbank_TF = torch.randn(T, F, generator=gen) * 0.3
        width = max(F // 16, 2)
        low = int(u0 * (F - width))
        step = max(T // 64, 1)
        t_T = torch.arange(T) // step
        on_T = ((t_T + int(u1 * period)) % period) < period // 2
        fbank_TF[:, low : low + width] += 2.0 * on_T[:, None].float()
        return fbank_TF
