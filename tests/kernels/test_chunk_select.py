"""STELLA's chunked audio selection (docs/methods/stella.md): exactly k kept, the chunk and edge rules, the walk law.

``check_rules`` re-derives the rules from the output alone (independently of both implementations) and is run on
adversarial rows: nothing pruned, whole chunks pruned, ties, all-zero importance, exactly k / fewer than k
unpruned. The kernel is also compared with the deterministic reference core on rows whose walk order is forced.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.chunk_select import chunk_select_given, chunk_select_ref, chunk_select_triton

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

L_A, K_A, S_A = 512, 256, 32  # STELLA: 64 x 8 audio patches, keep 256, chunks of 4 time steps x 8 bands
DRAWS = 20_000
Z_MAX = 5.0


def check_rules(ids: torch.Tensor, keep: torch.Tensor, pruned: torch.Tensor, k: int, S: int) -> None:
    """Every rule of §4.2 (and the fastav deficit rule) that can be read off one row's output."""
    B, L = keep.shape
    C = L // S
    assert ids.shape == (B, k)
    keep, pruned, ids = keep.cpu(), pruned.cpu(), ids.cpu()
    for b in range(B):
        kept = keep[b].nonzero().flatten()
        assert kept.numel() == k, f"row {b}: {kept.numel()} kept, expected {k}"
        assert torch.equal(ids[b], kept), f"row {b}: ids are not the kept indices in ascending order"
        kb, pb = keep[b].view(C, S), pruned[b].view(C, S)
        avail = (~pb).sum(1)
        if int(avail.sum()) < k:  # deficit: every unpruned patch kept, then pruned ones
            assert not (pb.logical_not() & ~kb).any(), f"row {b}: an unpruned patch was dropped in deficit"
            continue
        assert not (kb & pb).any(), f"row {b}: a pruned patch was kept although {int(avail.sum())} were unpruned"
        taken = kb.sum(1)
        partial = [c for c in range(C) if 0 < taken[c] < avail[c]]
        assert len(partial) <= 1, f"row {b}: several partially kept chunks {partial}"
        if not partial:
            continue
        c = partial[0]
        flags = kb[c][~pb[c]]  # kept flags of the chunk's unpruned positions, in position order
        m = int(flags.sum())
        is_prefix = bool(flags[:m].all())
        is_suffix = bool(flags[-m:].all())
        assert is_prefix or is_suffix, f"row {b}: boundary chunk {c} keeps neither a prefix nor a suffix"

        # unambiguous neighbours: a non-empty chunk kept whole was walked before the boundary; a missing chunk or a
        # non-empty chunk with nothing kept was not
        walked = [0 <= j < C and avail[j] > 0 and taken[j] == avail[j] for j in (c - 1, c + 1)]
        unwalked = [not 0 <= j < C or (avail[j] > 0 and taken[j] == 0) for j in (c - 1, c + 1)]
        if walked[0] and unwalked[1]:
            assert is_prefix, f"row {b}: chunk {c - 1} taken, {c + 1} not: must keep the first positions"
        if walked[1] and unwalked[0]:
            assert is_suffix, f"row {b}: chunk {c + 1} taken, {c - 1} not: must keep the last positions"


def _adversarial_rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    C = L_A // S_A
    imp = torch.rand(10, L_A, generator=gen)
    pruned = torch.zeros(10, L_A, dtype=torch.bool)
    # 0: nothing pruned -> 8 whole chunks
    # 1: chunks 0..5 fully pruned
    pruned[1].view(C, S_A)[:6] = True
    # 2: ties: equal importance everywhere, 30 % pruned
    imp[2] = 1.0
    pruned[2] = torch.rand(L_A, generator=gen) < 0.3
    # 3: all-zero importance (uniform walk), 30 % pruned
    imp[3] = 0.0
    pruned[3] = torch.rand(L_A, generator=gen) < 0.3
    # 4: exactly k unpruned
    pruned[4, torch.randperm(L_A, generator=gen)[: L_A - K_A]] = True
    # 5: everything pruned -> deficit of k
    pruned[5] = True
    # 6: k - 1 unpruned -> deficit of 1
    pruned[6, torch.randperm(L_A, generator=gen)[: L_A - K_A + 1]] = True
    # 7: all importance in one chunk, every chunk half pruned
    imp[7] = 0.0
    imp[7].view(C, S_A)[9] = 1.0
    pruned[7] = torch.rand(L_A, generator=gen) < 0.5
    # 8: every other chunk fully pruned (boundary neighbours are often empty)
    pruned[8].view(C, S_A)[::2] = True
    pruned[8].view(C, S_A)[1::2] = torch.rand(C // 2, S_A, generator=gen) < 0.2
    # 9: STELLA-like: pi = 1 on the top half by importance, 0 elsewhere
    pruned[9, imp[9].topk(K_A).indices] = True
    return imp, pruned


def test_adversarial_rows_follow_the_rules(device):
    imp, pruned = _adversarial_rows(torch.Generator().manual_seed(0))
    imp, pruned = imp.repeat(6, 1).to(device), pruned.repeat(6, 1).to(device)  # 6 random walks per case
    ids, keep = chunk_select_triton(imp, pruned, K_A, kernels.new_rng(17, device))
    check_rules(ids, keep, pruned, K_A, S_A)
    C = L_A // S_A
    taken = keep.view(-1, C, S_A).sum(-1)
    none_pruned = torch.arange(imp.shape[0], device=device) % 10 == 0
    assert torch.all((taken[none_pruned] == 0) | (taken[none_pruned] == S_A)), "no pruning: whole chunks only"
    assert torch.all((taken[none_pruned] == S_A).sum(1) == K_A // S_A)
    all_pruned = torch.arange(imp.shape[0], device=device) % 10 == 5
    assert torch.all((taken[all_pruned] == 0) | (taken[all_pruned] == S_A)), "deficit fill goes chunk by chunk"
    one_chunk = torch.arange(imp.shape[0], device=device) % 10 == 7
    assert torch.all(taken[one_chunk][:, 9] == (~pruned[one_chunk]).view(-1, C, S_A)[:, 9].sum(-1))
    # the reference follows the same rules
    ids_r, keep_r = chunk_select_ref(imp.cpu(), pruned.cpu(), K_A, kernels.new_rng(1))
    check_rules(ids_r, keep_r, pruned, K_A, S_A)


def test_forced_walk_matches_reference_core(device):
    """Chunk scores e^0, e^-25, e^-50, e^-75 fix the walk (Gumbel noise spans < 21): kernel == reference core.

    The coin (boundary with both or neither neighbour walked) is random in both, so a row must equal the
    reference with the coin on front or on back, and exactly where the neighbour rule fixes the side.
    """
    gen = torch.Generator().manual_seed(4)
    chunk_times, freq, rows = 2, 4, 48
    S, C = chunk_times * freq, 4
    L = S * C
    ranks = torch.stack([torch.randperm(C, generator=gen) for _ in range(rows)])  # walk position of each chunk
    imp = torch.exp(-25.0 * ranks.double()).float().repeat_interleave(S, dim=1) * chunk_times / S
    pruned = torch.rand(rows, L, generator=gen) < 0.3
    keys = -ranks.float()
    for k in (3, 8, 13, 20, 31):
        ids, keep = chunk_select_triton(
            imp.to(device),
            pruned.to(device),
            k,
            kernels.new_rng(k, device),
            chunk_times=chunk_times,
            freq_patches=freq,
        )
        check_rules(ids, keep, pruned, k, S)
        ones = torch.ones(rows, C, dtype=torch.bool)
        _, keep_front = chunk_select_given(imp, pruned, k, keys, ones, chunk_times=chunk_times, freq_patches=freq)
        _, keep_back = chunk_select_given(imp, pruned, k, keys, ~ones, chunk_times=chunk_times, freq_patches=freq)
        keep = keep.cpu()
        match = (keep == keep_front).all(1) | (keep == keep_back).all(1)
        assert match.all(), f"k={k}: rows {(~match).nonzero().flatten().tolist()} differ from the reference core"


def test_boundary_coin_is_fair(device):
    """k < chunk size, nothing pruned: the first walked chunk is the boundary with no walked neighbour."""
    chunk_times, freq = 2, 2
    imp = torch.rand(DRAWS // 4, 16, generator=torch.Generator().manual_seed(0)).to(device)
    pruned = torch.zeros_like(imp, dtype=torch.bool)
    for ids, _ in (
        chunk_select_triton(imp, pruned, 2, kernels.new_rng(6, device), chunk_times=chunk_times, freq_patches=freq),
        chunk_select_ref(imp, pruned, 2, kernels.new_rng(7, device), chunk_times=chunk_times, freq_patches=freq),
    ):
        within = ids % 4  # position inside the chunk
        front = (within == torch.tensor([0, 1], device=device)).all(1)
        back = (within == torch.tensor([2, 3], device=device)).all(1)
        assert torch.all(front | back) and torch.all(ids[:, 0] // 4 == ids[:, 1] // 4)
        n = imp.shape[0]
        assert abs(front.float().mean().item() - 0.5) <= Z_MAX * (0.25 / n) ** 0.5


def test_walk_includes_chunks_in_proportion_to_scores(device, inclusion):
    """No pruning, k = 2 chunks of 5: chunk inclusion = exact without-replacement inclusion of the chunk scores."""
    exact_inclusion, inclusion_z = inclusion
    scores = [0.5, 0.2, 0.15, 0.1, 0.05]
    imp = torch.tensor(scores).repeat_interleave(2).div(2).repeat(DRAWS, 1).to(device)  # S = 2, chunk sum = score
    pruned = torch.zeros_like(imp, dtype=torch.bool)
    ids, _ = chunk_select_triton(imp, pruned, 4, kernels.new_rng(2, device), chunk_times=1, freq_patches=2)
    chunks = ids[:, ::2] // 2
    hit = torch.zeros(DRAWS, 5, dtype=torch.bool, device=device).scatter_(1, chunks, True)
    z = inclusion_z(hit.sum(0).cpu(), DRAWS, exact_inclusion(scores, 2))
    assert z < Z_MAX, f"chunk inclusion off by {z:.1f} sigma"


def test_chunk_select_api_and_errors(device):
    imp = torch.rand(3, L_A, generator=torch.Generator().manual_seed(0)).to(device)
    pruned = torch.rand(3, L_A, generator=torch.Generator().manual_seed(1)).to(device) < 0.4
    rng = kernels.new_rng(5, device)
    ids, keep = chunk_select_triton(imp, pruned, K_A, rng)
    assert ids.dtype == torch.int64 and keep.dtype == torch.bool
    assert torch.equal(kernels.chunk_select(imp, pruned, K_A, rng)[0], ids)
    with kernels.use_backend("ref"):
        ids_r, keep_r = kernels.chunk_select(imp, pruned, K_A, rng)
        assert torch.equal(ids_r, kernels.chunk_select(imp, pruned, K_A, rng)[0])  # seeded from rng
    check_rules(ids_r, keep_r, pruned, K_A, S_A)
    with pytest.raises(ValueError, match="L = 500"):
        chunk_select_triton(imp[:, :500], pruned[:, :500], K_A, rng)
    with pytest.raises(ValueError, match="k = 513"):
        chunk_select_triton(imp, pruned, 513, rng)
    with pytest.raises(ValueError, match="bool"):
        chunk_select_triton(imp, pruned.float(), K_A, rng)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunk_select_stella_batch():
    imp, pruned = _adversarial_rows(torch.Generator().manual_seed(0))
    imp, pruned = imp.repeat(10, 1).cuda(), pruned.repeat(10, 1).cuda()  # 100 rows
    ids, keep = kernels.chunk_select(imp, pruned, K_A, kernels.new_rng(0, "cuda"))
    check_rules(ids, keep, pruned, K_A, S_A)


def test_check_rules_detects_violations():
    """The rule checker is not vacuous: hand-made violations fail it."""
    S, k = 4, 6
    pruned = torch.zeros(1, 16, dtype=torch.bool)

    def keep_of(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.zeros(1, 16, dtype=torch.bool)
        keep[0, idx] = True
        return torch.tensor([sorted(idx)]), keep

    check_rules(*keep_of([4, 5, 6, 7, 8, 9]), pruned, k, S)  # chunk 1 whole, chunk 2 front: valid
    bad = {
        "count": [4, 5, 6, 7, 8],
        "two partial chunks": [0, 1, 2, 4, 5, 6],
        "not a prefix or suffix": [4, 5, 6, 7, 8, 10],
        "wrong side (chunk 1 taken, 3 not: keep the front)": [4, 5, 6, 7, 10, 11],
    }
    for name, idx in bad.items():
        ids, keep = keep_of(idx)
        if name == "count":
            ids = torch.tensor([sorted(idx) + [15]])
        with pytest.raises(AssertionError):
            check_rules(ids, keep, pruned, k, S)
            pytest.fail(f"check_rules accepted: {name}")
    pruned_kept = pruned.clone()
    pruned_kept[0, 4] = True  # a pruned patch kept although 15 are unpruned
    with pytest.raises(AssertionError):
        check_rules(*keep_of([4, 5, 6, 7, 8, 9]), pruned_kept, k, S)
