"""The audio-video masked autoencoder: one encoder and one MAE decoder for CAV-MAE and STELLA's backbone.

Canonical token conventions (see :mod:`fastav.models.layers` for the details):

- audio: fbank ``(B, T, F)`` time x mel; patch ``i = t * Fp + f`` (TIME-MAJOR, ``Fp = F / 16``), flattened
  ``(dt, df)``; base size 64 x 8 = 512 patches. CAV-MAE checkpoints (frequency-major ``f * 64 + t``) are
  permuted on import; STELLA checkpoints are already time-major.
- video: ``(B, T, 3, H, W)``; patch ``j = frame * 196 + row * 14 + col`` (base size), flattened ``(p, q, c)``.

CAV-MAE (11 + 1 layers, 1 frame, fixed sin-cos positions, one mask token, joint decoder) and STELLA's backbone
(10 + 2 layers, 4 frames, learnable positions plus ``inter_pos_embed`` before the shared layers, per-modality
mask tokens, separate decoding) are two configurations of :class:`AVEncoder` / :class:`MAEDecoder` /
:class:`AVMAE` (``fastav.config.cavmae_base`` and ``stella_vggsound``); the token grid comes from the data
config (:class:`~fastav.models.layers.TokenGrid`).

Masking is per modality: uniform (default) or, for audio, CAV-MAE's structured 'time' / 'freq' / 'tf' masks;
and it can be restricted to a subset of patches (STELLA's selection, ``sel_a`` / ``sel_v`` of shape (B, K)):
visible tokens are drawn only among the selected ones (``int(L * (1 - ratio))`` of them, L the full count),
the decoder runs over the K selected tokens only, and the reconstruction loss covers the selected-but-hidden
patches only.

Deviations from the official code:

- CAV-MAE's audio-only and video-only passes loop ``ca = blk(a, 'a')`` over ``blocks_u`` without chaining, so
  with more than one shared layer only the last one counts; here the passes chain (identical for 11 + 1).
- Structured masks draw their rows / columns with torch's RNG (CAV-MAE uses Python's ``random``).
- STELLA initialises its audio sin-cos tables with a reshape that does not match its time-major token order;
  fresh fastav models use the canonical table (learnable anyway in STELLA; checkpoints load as stored).
- Fresh STELLA-style models use MAE's initialisation (Xavier-uniform Linear layers) rather than STELLA's
  N(0, 0.02); both are overwritten by the ImageNet-MAE initialisation
  (:func:`fastav.models.weights.adapt_imagenet_mae`).
- Losses are computed in fp32 whatever the parameter dtype.

Shape suffixes: B batch, A audio tokens, V video tokens, K tokens in play (all or the selected subset),
N visible tokens, L any token count, D encoder width, C decoder width, P patch vector length.

References: Gong et al., "Contrastive Audio-Visual Masked Autoencoder", ICLR 2023 (arXiv 2210.07839);
Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment", ICML 2024.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fastav.config import ModelConfig
from fastav.models.layers import (
    Block,
    Modality,
    PositionTable,
    TokenEmbed,
    TokenGrid,
    audio_sincos,
    drop_path_rates,
    gather_tokens,
    init_weights,
    patchify_audio,
    patchify_video,
    table_rows,
    video_sincos,
)
from fastav.models.losses import info_nce, masked_mse

# ---------------------------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MaskPlan:
    """Which of one modality's tokens the encoder sees and which the decoder reconstructs.

    The K tokens "in play" are all tokens of the grid (``pos_ids_BK`` None) or a selected subset
    (``pos_ids_BK`` = their grid positions). Indices below are into those K tokens.
    """

    pos_ids_BK: Tensor | None
    """Grid positions of the K tokens in play; None means all of them in grid order."""
    ids_keep_BN: Tensor
    """The N visible tokens (shuffled order), indices into the K tokens."""
    ids_restore_BK: Tensor
    """Unshuffle: token k sits at ``ids_restore_BK[:, k]`` in ``[visible..., hidden...]``."""
    mask_BK: Tensor
    """1.0 for hidden tokens (the reconstruction targets), 0.0 for visible ones."""

    @property
    def num_visible(self) -> int:
        return self.ids_keep_BN.shape[1]

    def visible_positions(self) -> Tensor:
        """Grid positions of the visible tokens, (B, N)."""
        if self.pos_ids_BK is None:
            return self.ids_keep_BN
        return self.pos_ids_BK.gather(1, self.ids_keep_BN)


def plan_from_noise(noise_BK: Tensor, num_visible: int, pos_ids_BK: Tensor | None = None) -> MaskPlan:
    """Keep the ``num_visible`` tokens of smallest noise per sample (MAE's argsort masking)."""
    B, K = noise_BK.shape
    ids_shuffle_BK = torch.argsort(noise_BK, dim=1)
    ids_restore_BK = torch.argsort(ids_shuffle_BK, dim=1)
    mask_BK = torch.ones(B, K, device=noise_BK.device)
    mask_BK[:, :num_visible] = 0.0
    mask_BK = mask_BK.gather(1, ids_restore_BK)
    return MaskPlan(pos_ids_BK, ids_shuffle_BK[:, :num_visible], ids_restore_BK, mask_BK)


def structured_audio_noise(
    batch: int, grid: TokenGrid, mode: Literal["time", "freq", "tf"], ratio: float, device: torch.device
) -> Tensor:
    """CAV-MAE's structured audio masks as noise over the full (time-major) grid: (B, A).

    Whole time columns ('time', ``int(Tp * ratio)`` of them), whole frequency rows ('freq', ``int(Fp * ratio)``)
    or both ('tf', ``0.7 * ratio`` of each) get noise 1.1 > any uniform draw, so argsort masking hides them first
    and fills the rest at random.
    """
    Tp, Fp = grid.audio_t, grid.audio_f
    noise_BTF = torch.rand(batch, Tp, Fp, device=device)
    scale = 0.7 if mode == "tf" else 1.0
    if mode in ("time", "tf"):
        noise_BTF = noise_BTF.masked_fill(_random_rows(batch, Tp, int(Tp * ratio * scale), device)[:, :, None], 1.1)
    if mode in ("freq", "tf"):
        noise_BTF = noise_BTF.masked_fill(_random_rows(batch, Fp, int(Fp * ratio * scale), device)[:, None, :], 1.1)
    return noise_BTF.reshape(batch, Tp * Fp)


def _random_rows(batch: int, n: int, k: int, device: torch.device) -> Tensor:
    """A (B, n) boolean mask with ``k`` random True entries per row."""
    ids_Bk = torch.rand(batch, n, device=device).argsort(dim=1)[:, :k]
    return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, ids_Bk, True)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    latent_BND: Tensor
    """Joint pass over [visible audio, visible video] after ``norm``: the decoder's input."""
    num_audio: int
    """How many of the latent tokens are audio (they come first)."""
    c_a_BND: Tensor
    """Audio-only pass through the shared layers after ``norm_a`` (contrastive features)."""
    c_v_BND: Tensor
    """Video-only pass through the shared layers after ``norm_v``."""


class AVEncoder(nn.Module):
    """Token embeddings, modality-specific layers, shared layers with three LayerNorm sets, three final norms.

    No CLS token: pooling is a mean over tokens. Every parameter lives in a submodule that is called (so ZeRO-3
    gathers it): ``embed_a`` / ``embed_v`` (projection, position table, modality embedding), ``inter_pos_a`` /
    ``inter_pos_v`` (STELLA's ``inter_pos_embed``), ``blocks_a`` / ``blocks_v`` / ``blocks_u`` and ``norm_a`` /
    ``norm_v`` / ``norm``; :func:`fastav.models.weights.official_name` maps them to the official names.
    """

    def __init__(self, cfg: ModelConfig, grid: TokenGrid, *, trainable_pos: bool | None = None) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.grid = grid
        learn_pos = cfg.pos_embed == "learnable" if trainable_pos is None else trainable_pos
        self.embed_a = TokenEmbed(grid.audio_patch_dim, D, grid.audio_tokens, trainable_pos=learn_pos)
        self.embed_v = TokenEmbed(grid.video_patch_dim, D, grid.video_tokens, trainable_pos=learn_pos)
        self.has_inter_pos = cfg.inter_pos_embed
        if cfg.inter_pos_embed:
            self.inter_pos_a = PositionTable(grid.audio_tokens, D)
            self.inter_pos_v = PositionTable(grid.video_tokens, D)
        rates = drop_path_rates(cfg.drop_path, cfg.specific_depth + cfg.shared_depth)
        tag_specific = cfg.tagged_norms == "all"

        def block(i: int, tagged: bool) -> Block:
            return Block(
                D, cfg.num_heads, cfg.mlp_ratio, tagged_norms=tagged, drop_path=rates[i], backend=cfg.attention
            )

        self.blocks_a = nn.ModuleList(block(i, tag_specific) for i in range(cfg.specific_depth))
        self.blocks_v = nn.ModuleList(block(i, tag_specific) for i in range(cfg.specific_depth))
        self.blocks_u = nn.ModuleList(block(cfg.specific_depth + i, True) for i in range(cfg.shared_depth))
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Sin-cos position tables (both pairs), N(0, 0.02) modality embeddings, MAE init of the layers."""
        self.apply(init_weights)
        D = self.embed_a.modality.shape[-1]
        with torch.no_grad():
            self.embed_a.pos.copy_(audio_sincos(D, self.grid))
            self.embed_v.pos.copy_(video_sincos(D, self.grid))
            if self.has_inter_pos:
                self.inter_pos_a.weight.copy_(audio_sincos(D, self.grid))
                self.inter_pos_v.weight.copy_(video_sincos(D, self.grid))
        nn.init.normal_(self.embed_a.modality, std=0.02)
        nn.init.normal_(self.embed_v.modality, std=0.02)

    # --- named steps ------------------------------------------------------------------------------------------------

    def embed(self, patches_BKP: Tensor, modality: Literal["a", "v"], pos_ids_BK: Tensor | None = None) -> Tensor:
        """Patch vectors at grid positions ``pos_ids_BK`` (all, in order, when None) -> tokens (B, K, D)."""
        return (self.embed_a if modality == "a" else self.embed_v)(patches_BKP, pos_ids_BK)

    def specific(self, x_BLD: Tensor, modality: Literal["a", "v"]) -> Tensor:
        """The modality-specific layers (joint LayerNorms, as in both official codes)."""
        for blk in self.blocks_a if modality == "a" else self.blocks_v:
            x_BLD = blk(x_BLD)
        return x_BLD

    def add_inter_pos(self, x_BLD: Tensor, modality: Literal["a", "v"], pos_ids_BL: Tensor | None = None) -> Tensor:
        """STELLA's second positional embedding, added right before the shared layers (no-op without it)."""
        if not self.has_inter_pos:
            return x_BLD
        return (self.inter_pos_a if modality == "a" else self.inter_pos_v)(x_BLD, pos_ids_BL)

    def shared(self, x_BLD: Tensor, modality: Modality, final_norm: bool = True) -> Tensor:
        """The shared layers with one modality's LayerNorm set, then its final norm."""
        for blk in self.blocks_u:
            x_BLD = blk(x_BLD, modality)
        if not final_norm:
            return x_BLD
        return {"joint": self.norm, "a": self.norm_a, "v": self.norm_v}[modality](x_BLD)

    def shared_joint(self, x_a_BAD: Tensor, x_v_BVD: Tensor, final_norm: bool = True) -> tuple[Tensor, Tensor]:
        """Joint pass over [audio, video] through the shared layers; returns the two parts."""
        y_BLD = self.shared(torch.cat([x_a_BAD, x_v_BVD], dim=1), "joint", final_norm)
        return y_BLD[:, : x_a_BAD.shape[1]], y_BLD[:, x_a_BAD.shape[1] :]

    # --- passes -----------------------------------------------------------------------------------------------------

    def encode_masked(
        self, patches_a_BKP: Tensor, plan_a: MaskPlan, patches_v_BKP: Tensor, plan_v: MaskPlan
    ) -> EncoderOutput:
        """Pre-training pass: embed only the visible patches, specific layers, then the three shared passes."""
        pos_a_BN, pos_v_BN = plan_a.visible_positions(), plan_v.visible_positions()
        x_a = self.embed(gather_tokens(patches_a_BKP, plan_a.ids_keep_BN), "a", pos_a_BN)
        x_v = self.embed(gather_tokens(patches_v_BKP, plan_v.ids_keep_BN), "v", pos_v_BN)
        x_a = self.add_inter_pos(self.specific(x_a, "a"), "a", pos_a_BN)
        x_v = self.add_inter_pos(self.specific(x_v, "v"), "v", pos_v_BN)
        latent_BND = self.shared(torch.cat([x_a, x_v], dim=1), "joint")
        return EncoderOutput(latent_BND, x_a.shape[1], self.shared(x_a, "a"), self.shared(x_v, "v"))

    def specific_codes(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> tuple[Tensor, Tensor]:
        """STELLA's ``inter_c_a`` / ``inter_c_v``: the full clip through the modality-specific layers, (B, A, D) and
        (B, V, D), before ``inter_pos_embed``."""
        p = self.grid.patch
        z_a = self.specific(self.embed(patchify_audio(fbank_BTF, p), "a"), "a")
        z_v = self.specific(self.embed(patchify_video(video_BTCHW, p), "v"), "v")
        return z_a, z_v

    def joint_codes(self, z_a_BAD: Tensor, z_v_BVD: Tensor) -> tuple[Tensor, Tensor]:
        """What the AVM reads: codes + ``inter_pos_embed`` through the joint shared layers, without the final norm."""
        return self.shared_joint(self.add_inter_pos(z_a_BAD, "a"), self.add_inter_pos(z_v_BVD, "v"), final_norm=False)

    def unimodal_features(self, fbank_BTF: Tensor | None, video_BTCHW: Tensor | None) -> tuple[Tensor | None, ...]:
        """Retrieval features (CAV-MAE's ``forward_feat``): each full, unmasked modality through its specific layers,
        the shared layers with its own LayerNorms and ``norm_a`` / ``norm_v``; token sequences (B, A, D), (B, V, D)."""
        p = self.grid.patch
        out: list[Tensor | None] = [None, None]
        if fbank_BTF is not None:
            x = self.specific(self.embed(patchify_audio(fbank_BTF, p), "a"), "a")
            out[0] = self.shared(self.add_inter_pos(x, "a"), "a")
        if video_BTCHW is not None:
            x = self.specific(self.embed(patchify_video(video_BTCHW, p), "v"), "v")
            out[1] = self.shared(self.add_inter_pos(x, "v"), "v")
        return tuple(out)


# ---------------------------------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------------------------------


class MAEDecoder(nn.Module):
    """MAE decoder: width C, its own position tables and modality embeddings, one shared mask token (CAV-MAE) or
    one per modality (STELLA), blocks run on the joint sequence (CAV-MAE) or per modality (STELLA), and a linear
    prediction head per modality (audio p*p, video p*p*3 values per patch)."""

    def __init__(self, cfg: ModelConfig, grid: TokenGrid) -> None:
        super().__init__()
        C = cfg.decoder_dim
        self.grid = grid
        self.joint = cfg.decoder_joint
        self.shared_mask_token = cfg.shared_mask_token
        learn_pos = cfg.pos_embed == "learnable"
        self.embed = nn.Linear(cfg.embed_dim, C)
        if cfg.shared_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, C))
        else:
            self.mask_token_a = nn.Parameter(torch.zeros(1, 1, C))
            self.mask_token_v = nn.Parameter(torch.zeros(1, 1, C))
        self.modality_a = nn.Parameter(torch.zeros(1, 1, C))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, grid.audio_tokens, C), requires_grad=learn_pos)
        self.pos_embed_v = nn.Parameter(torch.zeros(1, grid.video_tokens, C), requires_grad=learn_pos)
        tagged = cfg.tagged_norms == "all"
        self.blocks = nn.ModuleList(
            Block(C, cfg.decoder_heads, cfg.mlp_ratio, tagged_norms=tagged, backend=cfg.attention)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(C)
        self.pred_a = nn.Linear(C, grid.audio_patch_dim)
        self.pred_v = nn.Linear(C, grid.video_patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        C = self.modality_a.shape[-1]
        with torch.no_grad():
            self.pos_embed_a.copy_(audio_sincos(C, self.grid))
            self.pos_embed_v.copy_(video_sincos(C, self.grid))
        tokens = [self.mask_token] if self.shared_mask_token else [self.mask_token_a, self.mask_token_v]
        for param in [*tokens, self.modality_a, self.modality_v]:
            nn.init.normal_(param, std=0.02)

    def fill(self, y_BNC: Tensor, modality: Literal["a", "v"], plan: MaskPlan) -> Tensor:
        """Visible tokens + mask tokens, back in token order, plus positions and modality: (B, K, C)."""
        B, N, C = y_BNC.shape
        K = plan.ids_restore_BK.shape[1]
        if self.shared_mask_token:
            token = self.mask_token
        else:
            token = self.mask_token_a if modality == "a" else self.mask_token_v
        y_BKC = torch.cat([y_BNC, token.expand(B, K - N, C)], dim=1)
        y_BKC = gather_tokens(y_BKC, plan.ids_restore_BK)
        pos, kind = (self.pos_embed_a, self.modality_a) if modality == "a" else (self.pos_embed_v, self.modality_v)
        return y_BKC + table_rows(pos, plan.pos_ids_BK, B) + kind

    def run_blocks(self, y_BLC: Tensor) -> Tensor:
        for blk in self.blocks:
            y_BLC = blk(y_BLC)
        return self.norm(y_BLC)

    def forward(self, enc: EncoderOutput, plan_a: MaskPlan, plan_v: MaskPlan) -> tuple[Tensor, Tensor]:
        """Predicted patch vectors of every token in play: (B, K_a, p*p), (B, K_v, p*p*3)."""
        y_BNC = self.embed(enc.latent_BND)
        y_a = self.fill(y_BNC[:, : enc.num_audio], "a", plan_a)
        y_v = self.fill(y_BNC[:, enc.num_audio :], "v", plan_v)
        if self.joint:
            y = self.run_blocks(torch.cat([y_a, y_v], dim=1))
            y_a, y_v = y[:, : y_a.shape[1]], y[:, y_a.shape[1] :]
        else:
            y_a, y_v = self.run_blocks(y_a), self.run_blocks(y_v)
        return self.pred_a(y_a), self.pred_v(y_v)


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainOutput:
    loss: Tensor
    """mae_weight * (loss_mae_a + loss_mae_v) + contrastive_weight * loss_nce."""
    loss_mae_a: Tensor
    loss_mae_v: Tensor
    loss_nce: Tensor
    """InfoNCE before its weight."""
    nce_acc: Tensor
    """Fraction of video anchors whose own audio scores highest (over the gathered batch)."""
    pooled_a_BD: Tensor
    """Mean of the audio-only features over visible tokens (STELLA's ``audio_output``)."""
    pooled_v_BD: Tensor
    pred_a_BKP: Tensor
    pred_v_BKP: Tensor
    plan_a: MaskPlan
    plan_v: MaskPlan

    def metrics(self) -> dict[str, Tensor]:
        """The scalar tensors to log (read back only on logging steps)."""
        return {
            "loss": self.loss.detach(),
            "loss_mae_a": self.loss_mae_a.detach(),
            "loss_mae_v": self.loss_mae_v.detach(),
            "loss_nce": self.loss_nce.detach(),
            "nce_acc": self.nce_acc.detach(),
        }


class AVMAE(nn.Module):
    """Encoder + MAE decoder + the pre-training losses (reconstruction with ``norm_pix_loss`` over hidden patches,
    InfoNCE on mean-pooled visible tokens of the audio-only and video-only passes)."""

    def __init__(self, cfg: ModelConfig, grid: TokenGrid) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        self.encoder = AVEncoder(cfg, grid)
        self.decoder = MAEDecoder(cfg, grid)

    def plan_mask(
        self, modality: Literal["a", "v"], batch: int, device: torch.device, sel_BK: Tensor | None
    ) -> MaskPlan:
        """Draw one modality's mask, optionally restricted to the selected grid positions ``sel_BK``."""
        total = self.grid.audio_tokens if modality == "a" else self.grid.video_tokens
        ratio = self.cfg.mask_ratio_a if modality == "a" else self.cfg.mask_ratio_v
        num_visible = int(total * (1 - ratio))
        in_play = total if sel_BK is None else sel_BK.shape[1]
        if num_visible > in_play:
            raise ValueError(
                f"sel_{modality}: {in_play} selected tokens cannot hold the {num_visible} visible ones that "
                f"model.mask_ratio_{modality}={ratio} keeps of {total}; select more or raise the ratio"
            )
        if modality == "a" and self.cfg.audio_mask != "uniform":
            noise = structured_audio_noise(batch, self.grid, self.cfg.audio_mask, ratio, device)
            noise = noise if sel_BK is None else noise.gather(1, sel_BK)
        else:
            noise = torch.rand(batch, in_play, device=device)
        return plan_from_noise(noise, num_visible, sel_BK)

    def forward(
        self,
        fbank_BTF: Tensor,
        video_BTCHW: Tensor,
        *,
        sel_a_BK: Tensor | None = None,
        sel_v_BK: Tensor | None = None,
    ) -> PretrainOutput:
        """One pre-training forward pass with freshly drawn masks (torch's global RNG)."""
        self.grid.check_inputs(fbank_BTF, video_BTCHW)
        p = self.grid.patch
        patches_a = patchify_audio(fbank_BTF, p)
        patches_v = patchify_video(video_BTCHW, p)
        if sel_a_BK is not None:
            patches_a = gather_tokens(patches_a, sel_a_BK)
        if sel_v_BK is not None:
            patches_v = gather_tokens(patches_v, sel_v_BK)
        return self.forward_patches(patches_a, patches_v, sel_a_BK=sel_a_BK, sel_v_BK=sel_v_BK)

    def forward_patches(
        self,
        patches_a_BKP: Tensor,
        patches_v_BKP: Tensor,
        *,
        sel_a_BK: Tensor | None = None,
        sel_v_BK: Tensor | None = None,
    ) -> PretrainOutput:
        """:meth:`forward` on patch vectors already cut out: every patch of the grid in order (``sel`` None), or the
        patches at grid positions ``sel_*_BK`` (STELLA's selection gathered by ``kernels.gather_*_patches``, or
        STELLA+'s stored patches)."""
        for name, patches, sel, total, dim in (
            ("a", patches_a_BKP, sel_a_BK, self.grid.audio_tokens, self.grid.audio_patch_dim),
            ("v", patches_v_BKP, sel_v_BK, self.grid.video_tokens, self.grid.video_patch_dim),
        ):
            want = (total if sel is None else sel.shape[1], dim)
            if tuple(patches.shape[1:]) != want:
                raise ValueError(f"patches_{name}: got {tuple(patches.shape)}, expected (B, {want[0]}, {want[1]})")
        B, device = patches_a_BKP.shape[0], patches_a_BKP.device
        patches_a, patches_v = patches_a_BKP, patches_v_BKP
        plan_a = self.plan_mask("a", B, device, sel_a_BK)
        plan_v = self.plan_mask("v", B, device, sel_v_BK)
        enc = self.encoder.encode_masked(patches_a, plan_a, patches_v, plan_v)
        pred_a, pred_v = self.decoder(enc, plan_a, plan_v)
        return self.losses(enc, pred_a, pred_v, patches_a, patches_v, plan_a, plan_v)

    def losses(
        self,
        enc: EncoderOutput,
        pred_a_BKP: Tensor,
        pred_v_BKP: Tensor,
        patches_a_BKP: Tensor,
        patches_v_BKP: Tensor,
        plan_a: MaskPlan,
        plan_v: MaskPlan,
    ) -> PretrainOutput:
        cfg = self.cfg
        loss_a = masked_mse(pred_a_BKP, patches_a_BKP, plan_a.mask_BK, cfg.norm_pix_loss)
        loss_v = masked_mse(pred_v_BKP, patches_v_BKP, plan_v.mask_BK, cfg.norm_pix_loss)
        pooled_a, pooled_v = enc.c_a_BND.mean(dim=1), enc.c_v_BND.mean(dim=1)
        nce, acc = info_nce(
            pooled_a,
            pooled_v,
            tau=cfg.contrastive_tau,
            bidirectional=cfg.bidirectional_contrastive,
            gather=cfg.gather_negatives,
            gather_grad=cfg.gather_grad,
        )
        loss = cfg.mae_weight * (loss_a + loss_v) + cfg.contrastive_weight * nce
        return PretrainOutput(
            loss, loss_a, loss_v, nce, acc, pooled_a, pooled_v, pred_a_BKP, pred_v_BKP, plan_a, plan_v
        )

    @torch.no_grad()
    def embed_clips(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> tuple[Tensor, Tensor]:
        """L2-normalised retrieval embeddings of full, unmasked clips: (B, D) audio, (B, D) video."""
        self.grid.check_inputs(fbank_BTF, video_BTCHW)
        c_a_BAD, c_v_BVD = self.encoder.unimodal_features(fbank_BTF, video_BTCHW)
        return _unit_mean(c_a_BAD), _unit_mean(c_v_BVD)


def _unit_mean(x_BLD: Tensor | None) -> Tensor:
    if x_BLD is None:
        raise ValueError("both modalities are needed for retrieval embeddings")
    return nn.functional.normalize(x_BLD.mean(dim=1).float(), dim=-1)
