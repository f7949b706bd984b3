"""Separate audio and video encoders giving one feature vector each: what MLA and its baselines train.

MLA needs encoders that share nothing, so that a step on one modality leaves the other untouched. fastav's
encoder (:class:`~fastav.models.avmae.AVEncoder`) shares its last layers between the modalities; a
:class:`BranchEncoder` is one modality's whole path through it, copied out: token embedding, the modality's
specific layers, ``inter_pos_embed`` (STELLA), the shared layers run with that modality's LayerNorms, its final
norm (``norm_a`` / ``norm_v``), then the mean over tokens. That is CAV-MAE's ``audioonly`` / ``videoonly``
fine-tuning path (and the features of retrieval); the audio branch and the video branch each get their own copy of
the shared layers, as the official MLA code uses two separate CAV-MAE models. The LayerNorm sets a branch never
uses (the joint one and the other modality's) are frozen.

:class:`EncoderPair` holds the two encoders and their common output width ``dim`` (MLA's shared head needs one
width): fastav branches (:func:`branch_pair`) or the ResNet-18 pair of MLA's CREMA-D setup
(:func:`resnet_pair`).

Shape suffixes: B batch, L tokens, D width.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import Tensor, nn

from fastav.models.avmae import AVEncoder
from fastav.models.layers import patchify_audio, patchify_video
from fastav.models.resnet import AudioResNet18, VisualResNet18


class BranchEncoder(nn.Module):
    """One modality's path through a fastav encoder, as its own module: input -> (B, D) features."""

    def __init__(self, encoder: AVEncoder, modality: Literal["a", "v"]) -> None:
        super().__init__()
        self.modality = modality
        self.patch = encoder.grid.patch
        self.out_dim = encoder.norm.normalized_shape[0]
        own = copy.deepcopy
        self.embed = own(encoder.embed_a if modality == "a" else encoder.embed_v)
        self.blocks = own(encoder.blocks_a if modality == "a" else encoder.blocks_v)
        self.inter_pos = None
        if encoder.has_inter_pos:
            self.inter_pos = own(encoder.inter_pos_a if modality == "a" else encoder.inter_pos_v)
        self.shared = own(encoder.blocks_u)
        self.norm = own(encoder.norm_a if modality == "a" else encoder.norm_v)
        other = "v" if modality == "a" else "a"
        unused = ("norm1", "norm2", f"norm1_{other}", f"norm2_{other}")
        for block in self.shared:
            for tag in unused:
                getattr(block, tag).requires_grad_(False)

    def tokens(self, x: Tensor) -> Tensor:
        """(B, L, D) tokens after the final norm."""
        patches = patchify_audio(x, self.patch) if self.modality == "a" else patchify_video(x, self.patch)
        x_BLD = self.embed(patches)
        for blk in self.blocks:
            x_BLD = blk(x_BLD)
        if self.inter_pos is not None:
            x_BLD = self.inter_pos(x_BLD)
        for blk in self.shared:
            x_BLD = blk(x_BLD, self.modality)
        return self.norm(x_BLD)

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x).mean(dim=1)


class EncoderPair(nn.Module):
    """``audio(fbank) -> (B, dim)`` and ``video(frames) -> (B, dim)``, sharing no parameter."""

    def __init__(self, audio: nn.Module, video: nn.Module, dim: int) -> None:
        super().__init__()
        self.audio = audio
        self.video = video
        self.dim = dim

    def encode(self, modality: Literal["audio", "video"], x: Tensor) -> Tensor:
        return (self.audio if modality == "audio" else self.video)(x)


def branch_pair(encoder: AVEncoder) -> EncoderPair:
    """fastav's audio and video branches of ``encoder`` (its weights copied), each with its own shared layers."""
    audio, video = BranchEncoder(encoder, "a"), BranchEncoder(encoder, "v")
    return EncoderPair(audio, video, audio.out_dim)


def resnet_pair(width: int = 64) -> EncoderPair:
    """MLA's CREMA-D encoders: two ResNet-18 trained from scratch, (B, 8 * width) features each."""
    audio, video = AudioResNet18(width), VisualResNet18(width)
    return EncoderPair(audio, video, audio.out_dim)
