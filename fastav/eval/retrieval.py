"""Zero-shot audio <-> video retrieval of any module with ``embed_clips(fbank, video)`` over a process group.

What is measured (STELLA's and CAV-MAE's protocol): every clip of the retrieval set goes through the module
whole and unmasked (the unimodal path: :meth:`fastav.models.AVMAE.embed_clips`), giving one L2-normalised audio
and one video embedding; each clip's audio is a query against the video of *every* clip of the set (the
gallery is the whole set, gathered from all ranks, whatever task the clip belongs to), and the other way round.
A query's rank is the number of gallery items more similar (cosine) than its own partner, so rank 0 is a hit at
R@1. Reported per direction ('a2v': audio queries, 'v2a': video queries), overall and per task category (the
queries of one category, still against the whole gallery):

- ``r{K}``: percentage of queries whose partner ranks among the first K, for each K of ``eval.retrieval_ks``;
- ``median_rank``: median of the 1-based ranks (1 = perfect);
- ``n``: number of queries; chance level of R@K is ``100 * K / N`` for a gallery of N.

The module's train / eval mode is restored afterwards. Every rank must pass an evaluation loader whose ranks
hold the same number of batches (fastav's loaders pad the last batch and flag the padding with ``valid``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DIRECTIONS = ("a2v", "v2a")


@dataclass
class Embeddings:
    """Retrieval embeddings of a whole evaluation set (every rank's valid rows, in rank order)."""

    audio: Tensor
    """(N, D) L2-normalised, fp32."""
    video: Tensor
    """(N, D) L2-normalised, fp32."""
    group: Tensor
    """(N,) int64: the task (category) index of each clip."""
    index: Tensor
    """(N,) int64: the stable sample id of each clip."""


def _module_dtype(module: nn.Module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@torch.no_grad()
def embed(module: nn.Module, batches: Iterable[Mapping[str, Tensor]], *, device: torch.device) -> Embeddings:
    """Embeddings of every clip the loaders of all ranks read (collective: every rank must call it)."""
    modes = {m: m.training for m in module.modules()}  # each submodule's own mode (a frozen part may be in eval)
    module.eval()
    dtype = _module_dtype(module)
    parts: dict[str, list[Tensor]] = {"audio": [], "video": [], "group": [], "index": [], "valid": []}
    try:
        for batch in batches:
            fbank = batch["fbank"].to(device=device, dtype=dtype)
            video = batch["video"].to(device=device, dtype=dtype)
            emb_a, emb_v = module.embed_clips(fbank, video)
            rows = emb_a.shape[0]
            parts["audio"].append(emb_a.float())
            parts["video"].append(emb_v.float())
            parts["group"].append(batch["task"].to(device).long().view(-1))
            parts["index"].append(batch["index"].to(device).long().view(-1))
            valid = batch.get("valid")
            ones = torch.ones(rows, dtype=torch.bool, device=device)
            parts["valid"].append(ones if valid is None else valid.to(device).bool().view(-1))
    finally:
        module.train(modes[module])
        for m, mode in modes.items():
            m.training = mode
    if not parts["audio"]:
        raise ValueError("retrieval: the evaluation loader gave no batch")
    local = {k: torch.cat(v) for k, v in parts.items()}
    gathered = {k: _gather(v) for k, v in local.items()}
    keep = gathered.pop("valid").bool()
    return Embeddings(**{k: v[keep] for k, v in gathered.items()})


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank (all the same shape) in rank order; ``x`` itself when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    world = torch.distributed.get_world_size()
    if world == 1:
        return x
    send = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo gathers no bool tensors
    parts = [torch.empty_like(send) for _ in range(world)]
    torch.distributed.all_gather(parts, send.contiguous())
    out = torch.cat(parts)
    return out.bool() if x.dtype == torch.bool else out


def ranks_of_pairs(query_ND: Tensor, gallery_ND: Tensor, chunk: int = 1024) -> Tensor:
    """(N,) 0-based rank of gallery row i for query row i: how many gallery rows score strictly higher."""
    out = []
    for start in range(0, query_ND.shape[0], chunk):
        q = query_ND[start : start + chunk]
        sim_QN = q @ gallery_ND.t()
        rows = torch.arange(q.shape[0], device=q.device)
        own_Q = sim_QN[rows, rows + start]  # the same products as the row, so ties compare exactly
        out.append((sim_QN > own_Q[:, None]).sum(dim=1))
    return torch.cat(out)


def summarize(rank_N: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """R@K in percent for each K, the median 1-based rank and the query count."""
    r = rank_N.cpu().numpy()  # sync-ok: evaluation
    out: dict[str, float] = {f"r{k}": float(100.0 * np.mean(r < k)) for k in ks}
    out["median_rank"] = float(np.median(r + 1))
    out["n"] = int(r.size)
    return out


def retrieval_metrics(emb: Embeddings, *, ks: Sequence[int], group_names: Sequence[str]) -> dict[str, Any]:
    """``{direction: {"overall": {...}, "groups": {name: {...}}}, "gallery": N}`` (see the module docstring)."""
    out: dict[str, Any] = {"gallery": int(emb.audio.shape[0])}
    for direction in DIRECTIONS:
        query, gallery = (emb.audio, emb.video) if direction == "a2v" else (emb.video, emb.audio)
        rank_N = ranks_of_pairs(query, gallery)
        groups = {}
        for k, name in enumerate(group_names):
            mine = emb.group == k
            if bool(mine.any()):  # sync-ok: evaluation
                groups[name] = summarize(rank_N[mine], ks)
        out[direction] = {"overall": summarize(rank_N, ks), "groups": groups}
    return out


def evaluate_retrieval(
    module: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    device: torch.device,
    ks: Sequence[int] = (1, 5, 10),
    group_names: Sequence[str] = (),
) -> dict[str, Any]:
    """:func:`embed` then :func:`retrieval_metrics`; every rank gets the same result."""
    emb = embed(module, batches, device=device)
    names = list(group_names) or [f"group{k}" for k in range(int(emb.group.max()) + 1)]  # sync-ok: evaluation
    return retrieval_metrics(emb, ks=ks, group_names=names)


def format_retrieval(result: Mapping[str, Any], ks: Sequence[int]) -> str:
    """A plain-text table: one row per direction and group, R@K columns and the median rank."""
    head = ["direction", "group", "n", *[f"R@{k}" for k in ks], "MedR"]
    rows = [head]
    for direction in DIRECTIONS:
        block = result[direction]
        entries = [("all", block["overall"]), *block["groups"].items()]
        for name, m in entries:
            rows.append([direction, name, str(m["n"]), *[f"{m[f'r{k}']:.1f}" for k in ks], f"{m['median_rank']:g}"])
    n = result["gallery"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    chance = ", ".join(f"R@{k} {100.0 * min(k, n) / n:.1f}" for k in ks)
    return "\n".join([*lines, f"gallery {n} clips; chance {chance}"])
