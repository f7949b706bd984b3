"""fastav's fused Triton kernels for STELLA (issue 6): one API, whichever path runs.

Every op ``foo`` has a Triton implementation (``foo_triton``) and a plain-PyTorch reference ``foo_ref`` beside it
in the same file; ``foo`` picks one per call from the backend setting (``set_backend`` / ``use_backend`` /
env ``FASTAV_KERNELS``: "auto" | "triton" | "ref"). "auto" runs Triton where it can (CUDA tensors, or any tensors
when ``TRITON_INTERPRET=1`` was set before this package was imported) and falls back to the reference
otherwise (CPU tensors without the interpreter). On a GPU the launchers autotune block sizes; under the
interpreter they use fixed configs.

Ops (canonical patch orders: video j = frame*Hp*Wp + row*Wp + col, patch flattened (p, q, c); audio time-major
i = t*Fp + f, patch flattened (dt, df)):

- ``attention_importance(q, k, scale, temperature)``: (B, Lk) mean over heads and queries of the key softmax,
  flash-style, never holding the (B, H, Lq, Lk) map (docs/methods/stella.md).
- ``pooled_query(q, weights, candidates)``: (B, H, D) importance-weighted mean query over a candidate set.
- ``replay_correlation(q_past, q_cur, k, scale, candidates)``: (B, L) π = mean_h σ(<q_past − q_cur, k>·scale)
  on candidates (docs/methods/stella.md).
- ``bernoulli_prune``, ``prune_weights``, ``weighted_sample``, ``topk_indices``, ``topk_mask``,
  ``chunk_select``: the selection pieces (docs/methods/stella.md); ``select_video`` / ``select_audio``: a STELLA step's
  selection (with ``deterministic=True`` for the first step).
- ``gather_video_patches`` / ``gather_audio_patches``: the chosen patches straight from the (B, T, 3, H, W)
  video and the (B, 1024, 128) fbank.

On a GPU each launcher picks its block sizes among a few candidates: tuned once per machine and kept on disk
(``FASTAV_KERNEL_TUNING=cache``, the default; ``$FASTAV_TUNING_DIR``), so ranks and resumed runs launch the same
config, or the first candidate untuned (``fixed``: tests; ``set_tuning`` / ``use_tuning``). ``kernels.aot`` compiles
every candidate for sm_90 without a GPU (``python bench/kernels.py --compile``).

Randomness comes from a device tensor ``rng = new_rng(seed, device)`` ([seed, offset], int64); call
``advance_rng(rng)`` once per step (in place, no sync) and give concurrent call sites different ``stream`` ids.
The ``*_ref`` sampling ops take the same ``rng`` and ``stream`` and draw the same numbers (a Philox in torch ops),
so either path selects the same patches for the same state, and neither reads a value on the host.
"""

from kernels._utils import (
    BACKENDS,
    TUNING_MODES,
    advance_rng,
    get_backend,
    get_tuning,
    new_rng,
    philox_uniform_ref,
    set_backend,
    set_tuning,
    use_backend,
    use_tuning,
)
from kernels.attention_importance import (
    attention_importance,
    attention_importance_ref,
    attention_importance_triton,
    pooled_query,
    pooled_query_ref,
    pooled_query_triton,
)
from kernels.chunk_select import chunk_select, chunk_select_given, chunk_select_ref, chunk_select_triton
from kernels.patch_gather import (
    gather_audio_patches,
    gather_audio_patches_ref,
    gather_audio_patches_triton,
    gather_video_patches,
    gather_video_patches_ref,
    gather_video_patches_triton,
    patchify_audio_ref,
    patchify_video_ref,
)
from kernels.patch_select import select_audio, select_audio_ref, select_video, select_video_ref
from kernels.replay_correlation import replay_correlation, replay_correlation_ref, replay_correlation_triton
from kernels.weighted_sample import (
    bernoulli_prune,
    bernoulli_prune_ref,
    bernoulli_prune_triton,
    prune_weights,
    prune_weights_ref,
    prune_weights_triton,
    topk_indices,
    topk_indices_ref,
    topk_indices_triton,
    topk_mask,
    weighted_sample,
    weighted_sample_ref,
    weighted_sample_triton,
)

__all__ = [
    "BACKENDS",
    "TUNING_MODES",
    "advance_rng",
    "attention_importance",
    "attention_importance_ref",
    "attention_importance_triton",
    "bernoulli_prune",
    "bernoulli_prune_ref",
    "bernoulli_prune_triton",
    "chunk_select",
    "chunk_select_given",
    "chunk_select_ref",
    "chunk_select_triton",
    "gather_audio_patches",
    "gather_audio_patches_ref",
    "gather_audio_patches_triton",
    "gather_video_patches",
    "gather_video_patches_ref",
    "gather_video_patches_triton",
    "get_backend",
    "get_tuning",
    "new_rng",
    "patchify_audio_ref",
    "patchify_video_ref",
    "philox_uniform_ref",
    "pooled_query",
    "pooled_query_ref",
    "pooled_query_triton",
    "prune_weights",
    "prune_weights_ref",
    "prune_weights_triton",
    "replay_correlation",
    "replay_correlation_ref",
    "replay_correlation_triton",
    "select_audio",
    "select_audio_ref",
    "select_video",
    "select_video_ref",
    "set_backend",
    "set_tuning",
    "topk_indices",
    "topk_indices_ref",
    "topk_indices_triton",
    "topk_mask",
    "use_backend",
    "use_tuning",
    "weighted_sample",
    "weighted_sample_ref",
    "weighted_sample_triton",
]
