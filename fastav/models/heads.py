"""Classification heads that are not CAV-MAE's: STELLA's downstream MLP and the model that feeds it.

:class:`StellaHead` is STELLA's ``heads.Classifier``: a BERT-style pooler (Linear + tanh), then Linear ->
LayerNorm -> GELU -> Linear, all at the input width except the last layer. :class:`JointMeanClassifier` feeds it
STELLA's downstream feature: both full, unmasked modalities through the specific layers, ``inter_pos_embed``, the
joint pass through the shared layers and the final ``norm``, then the mean of the audio tokens and the mean of the
video tokens, concatenated (2 D: 1536 at base size). STELLA's VGGSound protocol trains only this head, the
backbone frozen (``stella_probe``). Initialisation: Xavier-uniform weights, zero biases (fastav's
:func:`~fastav.models.layers.init_weights`; STELLA draws N(0, 0.02)).

CAV-MAE's own head (LayerNorm + Linear on the mean of all tokens) lives in
:class:`~fastav.models.classifier.AVClassifier`.

Shape suffixes: B batch, A audio tokens, V video tokens, D width, C classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastav.config import ModelConfig
from fastav.models.avmae import AVEncoder
from fastav.models.layers import TokenGrid, init_weights, patchify_audio, patchify_video


class StellaHead(nn.Module):
    """Linear + tanh (pooler) -> Linear -> LayerNorm -> GELU -> Linear: (B, in_dim) -> (B, C)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(in_dim, in_dim), nn.Tanh())
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, num_classes)
        )
        self.apply(init_weights)

    def forward(self, x_BD: Tensor) -> Tensor:
        return self.mlp(self.pooler(x_BD))


class JointMeanClassifier(nn.Module):
    """fastav encoder + :class:`StellaHead` on [mean joint audio tokens, mean joint video tokens]."""

    def __init__(self, cfg: ModelConfig, grid: TokenGrid, num_classes: int) -> None:
        super().__init__()
        self.grid = grid
        self.encoder = AVEncoder(cfg, grid)
        self.head = StellaHead(2 * cfg.embed_dim, num_classes)

    def pooled(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> Tensor:
        """(B, 2 D): means of the audio and the video part of the joint shared pass, after ``norm``."""
        self.grid.check_inputs(fbank_BTF, video_BTCHW)
        enc, p = self.encoder, self.grid.patch
        z_a = enc.add_inter_pos(enc.specific(enc.embed(patchify_audio(fbank_BTF, p), "a"), "a"), "a")
        z_v = enc.add_inter_pos(enc.specific(enc.embed(patchify_video(video_BTCHW, p), "v"), "v"), "v")
        y_a_BAD, y_v_BVD = enc.shared_joint(z_a, z_v)
        return torch.cat([y_a_BAD.mean(dim=1), y_v_BVD.mean(dim=1)], dim=-1)

    def forward(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> Tensor:
        """Class logits (B, C)."""
        return self.head(self.pooled(fbank_BTF, video_BTCHW))
