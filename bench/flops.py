"""Model FLOPs of one training step, counted from the configuration (what bench/throughput.py divides by for MFU).

Every matrix product of fastav's step is counted, forward and backward, at 2 FLOPs per multiply-add; LayerNorm,
GELU, softmax, losses' element-wise work and gathers are not (they are not matrix products, and a FLOP counter
such as ``torch.utils.flop_counter`` does not count them either). Backward rules: a product whose weight is
trained costs its forward once more for the weight gradient and once more for the input gradient when the input
needs one (so 3x forward inside a trained network, 2x for the patch embedding, whose input is data); a pass run
without gradient costs its forward only. ``tests/bench/test_flops.py`` checks the count against
``torch.utils.flop_counter.FlopCounterMode`` on real debug-size steps of each method.

Per token of a transformer block of width W and MLP width M over L tokens: qkv 2*L*W*3W, output projection
2*L*W*W, MLP 2*L*W*M twice, attention scores and values 4*L^2*W (heads do not change the count).

Per step with B current clips (R rows trained: B, or 2B once replay rows join), grid A audio / V video tokens,
N_a / N_v visible (int(A * (1 - mask_ratio_a)), ...), K_a / K_v decoded (all, or STELLA's selection):

- MAE + InfoNCE row (forward): patch embedding of the visible patches, specific layers over N_a and N_v, the shared
  layers three times (joint N_a + N_v, audio-only N_a, video-only N_v), decoder embedding, decoder layers over K_a
  and K_v (separately; jointly for CAV-MAE's decoder), prediction heads over K_a and K_v. InfoNCE logits 2*R*R*D
  per direction. Trained: 3x forward minus the patch embedding's input gradient.
- STELLA adds, per current clip and without gradient: the full clip (A + V tokens) through the patch embedding,
  the specific layers and the joint shared layers twice (once for the relations, once for the AVM's matching
  pairs), the AVM's six q / k / v maps, the two importance maps 2*A*V*D each, the pooled queries and the replay
  correlation 2*(A + V)*D each; and the AVM trained on the matching pairs (maps 6*(A + V)*D^2, attention both ways
  8*A*V*D, head on 2D), 3x forward (its LayerNorms are trained, so its maps need input gradients too).
- DER++ and ER train the plain MAE on current + replayed rows (R = 2B); Finetune on the current rows (R = B).

At base size (recipe ``stella_vggsound``, B = 12, replay rows joined) this gives, per new clip: STELLA 871 GFLOP
(311 without gradient: the full clip through the 10 specific layers, twice through the 2 joint ones, the AVM's
maps and importance; 21 for training the AVM; 539 for the MAE + InfoNCE of the clip and its replayed partner over
the selected tokens), DER++ 801, Finetune 401; at the ``debug`` recipe's sizes STELLA 0.200 GFLOP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastav.config import Config
from fastav.models.layers import TokenGrid

REPLAY_METHODS = ("stella", "stella_plus", "derpp", "er")
"""Methods whose steady-state step trains as many replayed rows as current ones."""


def linear(tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of a dense map on ``tokens`` rows."""
    return 2 * tokens * d_in * d_out


def block(tokens: int, width: int, hidden: int) -> int:
    """Forward FLOPs of a pre-LN transformer block over ``tokens`` tokens (any number of heads)."""
    return linear(tokens, width, 4 * width) + 2 * linear(tokens, width, hidden) + 4 * tokens * tokens * width


@dataclass
class StepFlops:
    """FLOPs of one step of ``method`` with ``batch`` current clips, split into named parts (forward + backward)."""

    method: str
    batch: int
    rows: int
    """Rows the MAE trains on: current clips, plus as many replayed ones for replay methods."""
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def per_clip(self) -> float:
        """FLOPs per new (current) clip: the step's count over B."""
        return self.total / self.batch

    def summary(self) -> dict:
        return {
            "method": self.method,
            "batch": self.batch,
            "rows": self.rows,
            "per_step": self.total,
            "per_clip": self.per_clip,
            "parts_per_clip": {k: v / self.batch for k, v in self.parts.items()},
        }


def _mae_row(cfg: Config, grid: TokenGrid, k_a: int, k_v: int) -> tuple[int, int]:
    """(forward FLOPs of one MAE row, the part of it in the patch embedding)."""
    m = cfg.model
    D, C = m.embed_dim, m.decoder_dim
    M, Mc = int(D * m.mlp_ratio), int(C * m.mlp_ratio)
    n_a = int(grid.audio_tokens * (1 - m.mask_ratio_a))
    n_v = int(grid.video_tokens * (1 - m.mask_ratio_v))
    embed = linear(n_a, grid.audio_patch_dim, D) + linear(n_v, grid.video_patch_dim, D)
    specific = m.specific_depth * (block(n_a, D, M) + block(n_v, D, M))
    shared = m.shared_depth * (block(n_a + n_v, D, M) + block(n_a, D, M) + block(n_v, D, M))
    if m.decoder_joint:
        decoder = m.decoder_depth * block(k_a + k_v, C, Mc)
    else:
        decoder = m.decoder_depth * (block(k_a, C, Mc) + block(k_v, C, Mc))
    heads = linear(k_a, C, grid.audio_patch_dim) + linear(k_v, C, grid.video_patch_dim)
    forward = embed + specific + shared + linear(n_a + n_v, D, C) + decoder + heads
    return forward, embed


def step_flops(cfg: Config, method: str, batch: int | None = None) -> StepFlops:
    """The step's FLOPs (see the module docstring); ``batch`` defaults to ``cfg.data.batch_size``."""
    B = batch or cfg.data.batch_size
    grid = TokenGrid.from_config(cfg)
    m, s = cfg.model, cfg.method.stella
    D = m.embed_dim
    A, V = grid.audio_tokens, grid.video_tokens
    R = 2 * B if method in REPLAY_METHODS else B
    if method in ("stella", "stella_plus"):
        k_a, k_v = int(A * (1 - s.core_audio_ratio)), int(V * (1 - s.core_video_ratio))
    elif method in ("finetune", "multitask", "er", "derpp"):
        k_a, k_v = A, V
    else:
        raise ValueError(f"no FLOP count for method {method!r}")
    out = StepFlops(method, B, R)
    row, embed = _mae_row(cfg, grid, k_a, k_v)
    out.parts["mae_forward"] = R * row
    out.parts["mae_backward"] = R * (2 * row - embed)
    nce = (2 if m.bidirectional_contrastive else 1) * 2 * R * R * D
    out.parts["infonce"] = 3 * nce
    if method in ("stella", "stella_plus"):
        M = int(D * m.mlp_ratio)
        full_embed = linear(A, grid.audio_patch_dim, D) + linear(V, grid.video_patch_dim, D)
        specific = m.specific_depth * (block(A, D, M) + block(V, D, M))
        joint = m.shared_depth * block(A + V, D, M)
        maps = 6 * (A + V) * D * D  # q, k, v of both modalities
        out.parts["relations_nograd"] = B * (full_embed + specific + joint + maps + 2 * 2 * A * V * D + 2 * (A + V) * D)
        out.parts["avm_pairs_nograd"] = B * joint
        out.parts["correlation_nograd"] = B * 2 * (A + V) * D
        attention = 8 * A * V * D
        head = linear(1, 2 * D, 2 * D) + linear(1, 2 * D, 1)
        out.parts["avm_forward"] = B * (maps + attention + head)
        out.parts["avm_backward"] = 2 * out.parts["avm_forward"]
    return out


# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets; matched against torch's device name.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when it is not in :data:`BF16_PEAK_TFLOPS` (a CPU)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None
