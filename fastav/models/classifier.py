"""Fine-tuning model: the pre-training encoder without decoder or masking, mean pooling, and a linear head.

Modes (CAV-MAE's ``CAVMAEFT.forward``):

- ``multimodal``: both modalities through their specific layers, the joint shared pass, ``norm``, mean over all
  tokens.
- ``audioonly`` / ``videoonly``: one modality, the shared layers with its own LayerNorms, ``norm_a`` / ``norm_v``.
- ``missingaudioonly`` / ``missingvideoonly``: a model fine-tuned multimodally, given only audio (resp. video) at
  test time: the modality goes through the shared layers twice (joint LayerNorms + ``norm``, and its own
  LayerNorms + ``norm_a`` / ``norm_v``) and the two pooled vectors are averaged.

The head is ``LayerNorm(D) -> Linear(D, C)`` (``mlp_head``, the official name). Positional embeddings are
trainable by default, as CAV-MAE's ``tr_pos=True`` (its 164.907 M parameters are all trainable).

Deviation: STELLA's fine-tuning heads (pooler + MLP on [joint audio mean, joint video mean]) are not built here;
its ``inter_pos_embed`` is added before the shared layers when the encoder has it.

Shape suffixes: B batch, L tokens, D width, C classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fastav.config import ModelConfig
from fastav.models.avmae import AVEncoder
from fastav.models.layers import TokenGrid, init_weights, patchify_audio, patchify_video

FinetuneMode = Literal["multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly"]
MODES: tuple[str, ...] = ("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly")


class AVClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, grid: TokenGrid, num_classes: int, *, trainable_pos: bool = True) -> None:
        super().__init__()
        self.grid = grid
        self.encoder = AVEncoder(cfg, grid, trainable_pos=trainable_pos)
        self.mlp_head = nn.Sequential(nn.LayerNorm(cfg.embed_dim), nn.Linear(cfg.embed_dim, num_classes))
        self.mlp_head.apply(init_weights)

    def codes(self, x: Tensor | None, modality: Literal["a", "v"], mode: str) -> Tensor:
        """One full modality through its embedding, specific layers and ``inter_pos_embed``: (B, L, D)."""
        if x is None:
            raise ValueError(f"mode {mode!r} needs the {'fbank' if modality == 'a' else 'video'} input")
        enc, p = self.encoder, self.grid.patch
        patches = patchify_audio(x, p) if modality == "a" else patchify_video(x, p)
        return enc.add_inter_pos(enc.specific(enc.embed(patches, modality), modality), modality)

    def pooled(
        self, fbank_BTF: Tensor | None = None, video_BTCHW: Tensor | None = None, mode: FinetuneMode = "multimodal"
    ) -> Tensor:
        """The (B, D) vector the head sees in ``mode``."""
        if mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")
        self.grid.check_inputs(fbank_BTF, video_BTCHW)
        enc = self.encoder
        if mode == "multimodal":
            z_a, z_v = self.codes(fbank_BTF, "a", mode), self.codes(video_BTCHW, "v", mode)
            return enc.shared(torch.cat([z_a, z_v], dim=1), "joint").mean(dim=1)
        tag: Literal["a", "v"] = "a" if "audio" in mode else "v"
        z = self.codes(fbank_BTF if tag == "a" else video_BTCHW, tag, mode)
        own = enc.shared(z, tag).mean(dim=1)
        if mode.startswith("missing"):
            return 0.5 * (enc.shared(z, "joint").mean(dim=1) + own)
        return own

    def forward(
        self, fbank_BTF: Tensor | None = None, video_BTCHW: Tensor | None = None, mode: FinetuneMode = "multimodal"
    ) -> Tensor:
        """Class logits (B, C)."""
        return self.mlp_head(self.pooled(fbank_BTF, video_BTCHW, mode))
