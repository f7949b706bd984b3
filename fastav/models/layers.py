"""Building blocks shared by every fastav model: token grid, patchify, sin-cos tables, attention, ViT blocks.

Canonical conventions (the contract every model, kernel and checkpoint importer uses):

- **Audio** input is the normalised fbank ``(B, T, F)`` = ``(B, target_length, num_mel_bins)``, time x mel.
  Patches are ``p x p`` (p = 16) and ordered **time-major**: patch ``i = t * Fp + f`` with ``Fp = F / p``
  (base size: 64 x 8 = 512 patches). A patch is flattened in ``(dt, df)`` order: element ``dt * p + df``.
  This is STELLA's order (its chunked audio selection relies on it). CAV-MAE's is frequency-major
  (``f * Tp + t``, input transposed to ``(B, 1, F, T)``, patch flattened ``(df, dt)``); its checkpoints are
  permuted on import (:mod:`fastav.models.weights`).
- **Video** input is ``(B, T, 3, H, W)``, ImageNet-normalised. Patch ``j = frame * Hp * Wp + row * Wp + col``
  (base size: 196 per frame), flattened ``(p, q, c)`` (row in patch, column in patch, channel) as MAE's
  ``patchify``.
- **Patch embedding** is a ``Linear`` on these flattened patch vectors (``TokenEmbed.proj``), the same map as a
  stride-p convolution whose weight is reshaped; it applies unchanged to patches gathered by STELLA's selection.
- **Sin-cos tables**: video as MAE (first half of the channels encodes the column, second half the row,
  repeated over frames); audio as CAV-MAE's table permuted to time-major (first half encodes the time index t,
  second half the frequency index f).

Shape suffixes: B batch, T frames or fbank frames, F mel bins, A audio tokens, V video tokens, K tokens of a
subset (kept or selected), L any token count, D width, H heads, E head dim, P patch vector length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastav.config import Config, ConfigError

Modality = Literal["joint", "a", "v"]
AttentionBackend = Literal["sdpa", "xformers"]


# ---------------------------------------------------------------------------------------------------------------------
# Token grid and patchify
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of one clip, derived from the data config (base: 64 x 8 audio, 4 x 14 x 14 video)."""

    patch: int
    audio_t: int
    """Tp: audio patches along time."""
    audio_f: int
    """Fp: audio patches along mel frequency."""
    frames: int
    video_h: int
    """Hp: patch rows per frame."""
    video_w: int
    """Wp: patch columns per frame."""

    @property
    def audio_tokens(self) -> int:
        return self.audio_t * self.audio_f

    @property
    def video_tokens_per_frame(self) -> int:
        return self.video_h * self.video_w

    @property
    def video_tokens(self) -> int:
        return self.frames * self.video_tokens_per_frame

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch

    @property
    def video_patch_dim(self) -> int:
        return self.patch * self.patch * 3

    @classmethod
    def from_config(cls, cfg: Config) -> TokenGrid:
        """The grid of ``cfg.data`` (frame size, frames, fbank length and bins) at ``cfg.model.patch_size``."""
        p = cfg.model.patch_size
        for name in ("frame_size", "target_length", "num_mel_bins"):
            value = getattr(cfg.data, name)
            if value % p:
                raise ConfigError(f"data.{name}: got {value}; accepted: a multiple of model.patch_size ({p})")
        return cls(
            patch=p,
            audio_t=cfg.data.target_length // p,
            audio_f=cfg.data.num_mel_bins // p,
            frames=cfg.data.num_frames,
            video_h=cfg.data.frame_size // p,
            video_w=cfg.data.frame_size // p,
        )

    def check_inputs(self, fbank_BTF: Tensor | None, video_BTCHW: Tensor | None) -> None:
        """Raise a ValueError naming the tensor when a batch does not match this grid."""
        p = self.patch
        if fbank_BTF is not None and tuple(fbank_BTF.shape[1:]) != (self.audio_t * p, self.audio_f * p):
            raise ValueError(
                f"fbank: expected (B, {self.audio_t * p}, {self.audio_f * p}) (data.target_length, "
                f"data.num_mel_bins), got {tuple(fbank_BTF.shape)}"
            )
        want = (self.frames, 3, self.video_h * p, self.video_w * p)
        if video_BTCHW is not None and tuple(video_BTCHW.shape[1:]) != want:
            raise ValueError(f"video: expected (B, {', '.join(map(str, want))}), got {tuple(video_BTCHW.shape)}")


def patchify_audio(fbank_BTF: Tensor, p: int) -> Tensor:
    """(B, T, F) fbank -> (B, A, p*p) patches, time-major (i = t*Fp + f), each flattened (dt, df)."""
    B, T, F_ = fbank_BTF.shape
    x = fbank_BTF.reshape(B, T // p, p, F_ // p, p).permute(0, 1, 3, 2, 4)  # (B, Tp, Fp, dt, df)
    return x.reshape(B, (T // p) * (F_ // p), p * p)


def unpatchify_audio(patches_BAP: Tensor, grid: TokenGrid) -> Tensor:
    """Inverse of :func:`patchify_audio`: (B, A, p*p) -> (B, T, F)."""
    B, p = patches_BAP.shape[0], grid.patch
    x = patches_BAP.reshape(B, grid.audio_t, grid.audio_f, p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B, grid.audio_t * p, grid.audio_f * p)


def patchify_video(video_BTCHW: Tensor, p: int) -> Tensor:
    """(B, T, C, H, W) frames -> (B, V, p*p*C) patches (j = frame*Hp*Wp + row*Wp + col), each flattened (p, q, c)."""
    B, T, C, H, W = video_BTCHW.shape
    x = video_BTCHW.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 4, 6, 2)  # (B, T, Hp, Wp, p, q, C)
    return x.reshape(B, T * (H // p) * (W // p), p * p * C)


def unpatchify_video(patches_BVP: Tensor, grid: TokenGrid) -> Tensor:
    """Inverse of :func:`patchify_video`: (B, V, p*p*3) -> (B, T, 3, H, W)."""
    B, p = patches_BVP.shape[0], grid.patch
    x = patches_BVP.reshape(B, grid.frames, grid.video_h, grid.video_w, p, p, 3).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(B, grid.frames, 3, grid.video_h * p, grid.video_w * p)


def gather_tokens(x_BLD: Tensor, ids_BK: Tensor) -> Tensor:
    """Rows ``ids_BK`` of each sample: (B, L, D), (B, K) -> (B, K, D)."""
    return x_BLD.gather(1, ids_BK.unsqueeze(-1).expand(-1, -1, x_BLD.shape[-1]))


def table_rows(table_1LD: Tensor, ids_BK: Tensor | None, batch: int) -> Tensor:
    """A (1, L, D) embedding table at token positions ``ids_BK`` (all L positions when None)."""
    if ids_BK is None:
        return table_1LD.expand(batch, -1, -1)
    return table_1LD[0][ids_BK]


# ---------------------------------------------------------------------------------------------------------------------
# Sin-cos positional tables
# ---------------------------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos_L: Tensor) -> Tensor:
    """MAE's 1-D table: (L,) positions -> (L, dim), sines in the first half, cosines in the second (float64)."""
    omega_E = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out_LE = pos_L.to(torch.float64)[:, None] * omega_E[None, :]
    return torch.cat([out_LE.sin(), out_LE.cos()], dim=1)


def sincos_2d(dim: int, first_L: Tensor, second_L: Tensor) -> Tensor:
    """2-D table: the first half of the channels encodes ``first_L``, the second half ``second_L``; (L, dim) fp32."""
    return torch.cat([sincos_1d(dim // 2, first_L), sincos_1d(dim // 2, second_L)], dim=1).float()


def audio_sincos(dim: int, grid: TokenGrid) -> Tensor:
    """(1, A, dim) table in the canonical time-major order; channels [0, dim/2) encode t, [dim/2, dim) encode f."""
    t_A = torch.arange(grid.audio_t).repeat_interleave(grid.audio_f)
    f_A = torch.arange(grid.audio_f).repeat(grid.audio_t)
    return sincos_2d(dim, t_A, f_A)[None]


def video_sincos(dim: int, grid: TokenGrid) -> Tensor:
    """(1, V, dim) table: MAE's per-frame table (first half column, second half row) repeated over frames."""
    row = torch.arange(grid.video_h).repeat_interleave(grid.video_w)
    col = torch.arange(grid.video_w).repeat(grid.video_h)
    return sincos_2d(dim, col, row).repeat(grid.frames, 1)[None]


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------

_override_backend: AttentionBackend | None = None
"""Tests set this to force one backend everywhere (nanochat's ``_override_impl``)."""


def _xformers_ops():  # the xformers.ops module, or None when it is not installed
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def attend(q_BHLE: Tensor, k_BHME: Tensor, v_BHME: Tensor, backend: AttentionBackend = "sdpa") -> Tensor:
    """softmax(q k^T / sqrt(E)) v -> (B, H, L, E) through PyTorch SDPA, or xformers when asked, installed and on CUDA.

    xformers has no CPU path, so 'xformers' falls back to SDPA on the CPU or when it is not installed.
    """
    backend = _override_backend or backend
    if backend == "xformers" and q_BHLE.is_cuda:
        xops = _xformers_ops()
        if xops is not None:
            out_BLHE = xops.memory_efficient_attention(
                q_BHLE.transpose(1, 2), k_BHME.transpose(1, 2), v_BHME.transpose(1, 2)
            )
            return out_BLHE.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHLE, k_BHME, v_BHME)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, backend: AttentionBackend = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.backend: AttentionBackend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        qkv_3BHLE = self.qkv(x_BLD).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out_BHLE = attend(qkv_3BHLE[0], qkv_3BHLE[1], qkv_3BHLE[2], self.backend)
        return self.proj(out_BHLE.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of whole samples with probability ``p`` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x_BLD: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x_BLD
        keep_B11 = x_BLD.new_empty(x_BLD.shape[0], 1, 1).bernoulli_(1.0 - self.p)
        return x_BLD * keep_B11 / (1.0 - self.p)


class Block(nn.Module):
    """Pre-LN ViT block whose attention and MLP weights serve three LayerNorm sets.

    ``modality='joint'`` uses ``norm1``/``norm2``; 'a' and 'v' use ``norm1_a``/``norm2_a`` and ``norm1_v``/
    ``norm2_v`` (CAV-MAE's design, kept by STELLA). Blocks built with ``tagged_norms=False`` carry only the joint
    set and accept only ``modality='joint'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        tagged_norms: bool,
        drop_path: float = 0.0,
        backend: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.tagged_norms = tagged_norms
        if tagged_norms:
            self.norm1_a, self.norm2_a = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.norm1_v, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def norms(self, modality: Modality) -> tuple[nn.LayerNorm, nn.LayerNorm]:
        if modality == "joint":
            return self.norm1, self.norm2
        if not self.tagged_norms:
            raise ValueError(f"this block has no {modality!r} LayerNorms (built with tagged_norms=False)")
        return (self.norm1_a, self.norm2_a) if modality == "a" else (self.norm1_v, self.norm2_v)

    def forward(self, x_BLD: Tensor, modality: Modality = "joint") -> Tensor:
        norm1, norm2 = self.norms(modality)
        x_BLD = x_BLD + self.drop_path(self.attn(norm1(x_BLD)))
        return x_BLD + self.drop_path(self.mlp(norm2(x_BLD)))


class TokenEmbed(nn.Module):
    """Patch vectors -> tokens: ``proj`` (a Linear on flattened patches, equal to a stride-p conv whose weight is
    reshaped), plus the rows of the position table ``pos`` at the patches' grid positions, plus the modality
    embedding ``modality``. The same map serves all patches or a gathered subset (STELLA's selection)."""

    def __init__(self, patch_dim: int, dim: int, num_tokens: int, *, trainable_pos: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_tokens, dim), requires_grad=trainable_pos)
        self.modality = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, patches_BKP: Tensor, pos_ids_BK: Tensor | None = None) -> Tensor:
        return self.proj(patches_BKP) + table_rows(self.pos, pos_ids_BK, patches_BKP.shape[0]) + self.modality


class PositionTable(nn.Module):
    """A learnable (1, L, D) table added at given grid positions (STELLA's ``inter_pos_embed``)."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, x_BLD: Tensor, pos_ids_BL: Tensor | None = None) -> Tensor:
        return x_BLD + table_rows(self.weight, pos_ids_BL, x_BLD.shape[0])


def init_weights(module: nn.Module) -> None:
    """MAE / CAV-MAE initialisation: Xavier-uniform Linear weights (patch embeddings included), zero biases,
    unit LayerNorms. Parameters (tables, tokens) are initialised by their owners."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over ``depth`` blocks (timm's rule)."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; works on the meta device."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable
