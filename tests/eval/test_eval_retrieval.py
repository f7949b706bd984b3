"""Retrieval metrics on a hand-built similarity case with ranks known by construction, and :func:`embed`'s handling of
the module (mode, dtype) and of padding rows."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fastav.eval import Embeddings, embed, evaluate_retrieval, format_retrieval, ranks_of_pairs, retrieval_metrics

# Similarity of audio i (row) to video j (column). a2v rank of clip i: entries of row i strictly above M[i, i];
# v2a rank of clip i: entries of column i strictly above M[i, i]. Ties with the partner (row 0: j = 2; row 1: j = 2;
# row 2: j = 1, 5; row 5: j = 0, 1, 4; column 1: i = 5; column 2: i = 4; column 3: i = 4) do not count.
M = [
    [5, 1, 5, 2, 0, 3],
    [6, 4, 4, 1, 5, 0],
    [2, 1, 1, 0, 0, 1],
    [7, 8, 9, 3, 4, 6],
    [0, 2, 1, 3, 9, 2],
    [4, 4, 5, 6, 4, 4],
]
A2V_RANKS = [0, 2, 1, 5, 0, 2]  # row i: how many of M[i, :] exceed M[i, i]
V2A_RANKS = [2, 1, 4, 1, 0, 1]  # column i: how many of M[:, i] exceed M[i, i]
GROUP = [0, 0, 1, 1, 0, 2]  # g0 = clips 0, 1, 4; g1 = clips 2, 3; g2 = clip 5; g3 has none
NAMES = ["g0", "g1", "g2", "g3"]
KS = (1, 2, 5)

# Expected figures, worked out by hand from the ranks above (R@K: share of ranks < K; median of rank + 1).
EXPECTED = {
    "a2v": {
        "overall": {"r1": 100 * 2 / 6, "r2": 100 * 3 / 6, "r5": 100 * 5 / 6, "median_rank": 2.5, "n": 6},
        "groups": {
            "g0": {"r1": 100 * 2 / 3, "r2": 100 * 2 / 3, "r5": 100.0, "median_rank": 1.0, "n": 3},
            "g1": {"r1": 0.0, "r2": 50.0, "r5": 50.0, "median_rank": 4.0, "n": 2},
            "g2": {"r1": 0.0, "r2": 0.0, "r5": 100.0, "median_rank": 3.0, "n": 1},
        },
    },
    "v2a": {
        "overall": {"r1": 100 * 1 / 6, "r2": 100 * 4 / 6, "r5": 100.0, "median_rank": 2.0, "n": 6},
        "groups": {
            "g0": {"r1": 100 * 1 / 3, "r2": 100 * 2 / 3, "r5": 100.0, "median_rank": 2.0, "n": 3},
            "g1": {"r1": 0.0, "r2": 50.0, "r5": 100.0, "median_rank": 3.5, "n": 2},
            "g2": {"r1": 0.0, "r2": 100.0, "r5": 100.0, "median_rank": 2.0, "n": 1},
        },
    },
}


def hand_embeddings() -> tuple[Tensor, Tensor]:
    """Unit vectors with audio[i] . video[j] = M[i][j] / 10: video j = e_j, audio i = (M[i] / 10, filler) where the
    filler coordinate brings every audio row to norm 1 (so row and column orders of M both survive)."""
    m = torch.tensor(M, dtype=torch.float32) / 10
    n = m.shape[0]
    filler = torch.sqrt(3.0 - (m * m).sum(dim=1, keepdim=True))  # every row of M / 10 has squared norm < 3
    audio = torch.cat([m, filler], dim=1) / 3**0.5
    video = torch.cat([torch.eye(n), torch.zeros(n, 1)], dim=1)
    assert torch.allclose(audio.norm(dim=1), torch.ones(n)) and torch.allclose(audio @ video.t(), m / 3**0.5)
    return audio, video


def hand_set() -> Embeddings:
    audio, video = hand_embeddings()
    return Embeddings(audio=audio, video=video, group=torch.tensor(GROUP), index=torch.arange(len(GROUP)))


def assert_block(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_ranks_of_pairs_counts_strictly_higher_scores_only(chunk: int) -> None:
    audio, video = hand_embeddings()
    assert ranks_of_pairs(audio, video, chunk=chunk).tolist() == A2V_RANKS
    assert ranks_of_pairs(video, audio, chunk=chunk).tolist() == V2A_RANKS


def test_retrieval_metrics_per_direction_and_group_against_whole_gallery() -> None:
    result = retrieval_metrics(hand_set(), ks=KS, group_names=NAMES)
    assert result["gallery"] == 6
    assert set(result) == {"gallery", "a2v", "v2a"}
    for direction, want in EXPECTED.items():
        assert_block(result[direction]["overall"], want["overall"])
        assert list(result[direction]["groups"]) == ["g0", "g1", "g2"]  # g3 has no query: no entry
        for name, figures in want["groups"].items():
            assert_block(result[direction]["groups"][name], figures)


def test_format_retrieval_table() -> None:
    result = retrieval_metrics(hand_set(), ks=KS, group_names=NAMES)
    lines = format_retrieval(result, KS).splitlines()
    assert lines[0].split() == ["direction", "group", "n", "R@1", "R@2", "R@5", "MedR"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[1:-1]}
    assert rows[("a2v", "all")] == ["6", "33.3", "50.0", "83.3", "2.5"]
    assert rows[("a2v", "g1")] == ["2", "0.0", "50.0", "50.0", "4"]
    assert rows[("v2a", "all")] == ["6", "16.7", "66.7", "100.0", "2"]
    assert rows[("v2a", "g1")] == ["2", "0.0", "50.0", "100.0", "3.5"]
    assert len(rows) == 8  # (all, g0, g1, g2) x 2 directions
    assert lines[-1] == "gallery 6 clips; chance R@1 16.7, R@2 33.3, R@5 83.3"


# ---------------------------------------------------------------------------------------------------------------------
# embed()
# ---------------------------------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """embed_clips returns its inputs' first feature rows as the embeddings and records what it saw."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype))
        self.inner = nn.Linear(1, 1)
        self.seen: list[dict] = []

    def embed_clips(self, fbank: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        self.seen.append({"training": self.training, "inner_training": self.inner.training,
                          "dtypes": (fbank.dtype, video.dtype)})  # fmt: skip
        return nn.functional.normalize(fbank[:, 0] * self.scale, dim=-1), nn.functional.normalize(video[:, 0], dim=-1)


def batches_of(audio: Tensor, video: Tensor, group: list[int], size: int, *, pad: bool = True) -> list[dict]:
    """Evaluation batches of ``size`` rows (fbank (B, 1, D), video (B, 1, D)); the last one padded with copies of
    row 0 flagged ``valid`` False."""
    out = []
    n = audio.shape[0]
    for start in range(0, n, size):
        rows = list(range(start, min(start + size, n)))
        valid = [True] * len(rows)
        if pad:
            valid += [False] * (size - len(rows))
            rows += [0] * (size - len(rows))
        idx = torch.tensor(rows)
        batch = {
            "fbank": audio[idx, None].clone(),
            "video": video[idx, None].clone(),
            "task": torch.tensor(group)[idx],
            "index": idx + 100,
            "valid": torch.tensor(valid),
        }
        out.append(batch)
    return out


@pytest.mark.parametrize("start_training", [True, False])
def test_embed_runs_in_eval_mode_and_restores_the_mode(start_training: bool) -> None:
    module = Recorder()
    module.train(start_training)
    audio, video = hand_embeddings()
    embed(module, batches_of(audio, video, GROUP, 4), device=torch.device("cpu"))
    assert [s["training"] for s in module.seen] == [False, False]
    assert [s["inner_training"] for s in module.seen] == [False, False]
    assert module.training is start_training
    assert module.inner.training is start_training


def test_embed_restores_each_submodule_mode_and_after_an_error() -> None:
    module = Recorder()
    module.train()
    module.inner.eval()  # e.g. a frozen part kept in eval mode during training
    audio, video = hand_embeddings()
    embed(module, batches_of(audio, video, GROUP, 4), device=torch.device("cpu"))
    assert module.training and not module.inner.training

    bad = batches_of(audio, video, GROUP, 4)
    del bad[1]["video"]
    with pytest.raises(KeyError):
        embed(module, bad, device=torch.device("cpu"))
    assert module.training and not module.inner.training


def test_embed_drops_padding_rows_and_keeps_order() -> None:
    audio, video = hand_embeddings()
    batches = batches_of(audio, video, GROUP, 4)  # 6 clips: a full batch and one with 2 padding rows
    assert batches[1]["valid"].tolist() == [True, True, False, False]
    emb = embed(Recorder(), batches, device=torch.device("cpu"))
    assert emb.index.tolist() == [100, 101, 102, 103, 104, 105]
    assert emb.group.tolist() == GROUP
    assert emb.group.dtype == torch.int64 and emb.index.dtype == torch.int64
    torch.testing.assert_close(emb.audio, audio)
    torch.testing.assert_close(emb.video, video)
    # the same figures as the hand-built set: the padding copies of clip 0 are not in the gallery
    assert evaluate_retrieval(Recorder(), batches, device=torch.device("cpu"), ks=KS, group_names=NAMES) == (
        retrieval_metrics(hand_set(), ks=KS, group_names=NAMES)
    )


def test_embed_without_valid_key_keeps_every_row() -> None:
    audio, video = hand_embeddings()
    batches = batches_of(audio, video, GROUP, 3, pad=False)
    for b in batches:
        del b["valid"]
    emb = embed(Recorder(), batches, device=torch.device("cpu"))
    assert emb.index.tolist() == [100, 101, 102, 103, 104, 105]


def test_embed_feeds_inputs_in_the_module_dtype_and_returns_fp32() -> None:
    module = Recorder(dtype=torch.float64)
    module.inner.double()
    audio, video = hand_embeddings()
    emb = embed(module, batches_of(audio, video, GROUP, 4), device=torch.device("cpu"))
    assert {s["dtypes"] for s in module.seen} == {(torch.float64, torch.float64)}
    assert emb.audio.dtype == torch.float32 and emb.video.dtype == torch.float32

    module = Recorder(dtype=torch.bfloat16)
    embed(module, batches_of(audio, video, GROUP, 4), device=torch.device("cpu"))
    assert {s["dtypes"] for s in module.seen} == {(torch.bfloat16, torch.bfloat16)}


def test_embed_without_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="no batch"):
        embed(Recorder(), [], device=torch.device("cpu"))


def test_evaluate_retrieval_default_group_names() -> None:
    audio, video = hand_embeddings()
    result = evaluate_retrieval(Recorder(), batches_of(audio, video, GROUP, 4), device=torch.device("cpu"), ks=KS)
    assert list(result["a2v"]["groups"]) == ["group0", "group1", "group2"]
    assert_block(result["v2a"]["groups"]["group1"], EXPECTED["v2a"]["groups"]["g1"])
