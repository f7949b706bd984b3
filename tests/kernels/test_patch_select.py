"""select_video / select_audio (a STELLA step's selection) and the no-host-sync check of the step.

On a GPU the step runs under ``torch.cuda.set_sync_debug_mode("error")``; on the CPU the ``host_reads`` recorder
(tests/conftest.py) lists every ATen call that would synchronise, on both backends.
"""

from __future__ import annotations

import pytest
import torch

import kernels

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

L_V, K_V, L_A, K_A = 784, 392, 512, 256


def _valid(ids: torch.Tensor, B: int, k: int, L: int) -> None:
    assert ids.shape == (B, k) and ids.dtype == torch.int64
    assert torch.all((ids >= 0) & (ids < L))
    assert torch.all(ids.diff(dim=1) > 0), "ids must be ascending and distinct"


def _importance(B: int, L: int, device: str, seed: int) -> torch.Tensor:
    return torch.rand(B, L, generator=torch.Generator().manual_seed(seed)).softmax(-1).to(device)


def test_select_video_step(device):
    B = 4  # 2 current + 2 replay rows
    imp = _importance(B, L_V, device, 0)
    cand = kernels.topk_mask(imp, K_V)
    pi = torch.rand(B, L_V, generator=torch.Generator().manual_seed(1)).to(device) * cand
    rng = kernels.new_rng(0, device)
    ids = kernels.select_video(imp, pi, K_V, rng)
    _valid(ids, B, K_V, L_V)
    assert torch.equal(ids, kernels.select_video(imp, pi, K_V, rng))
    assert not torch.equal(ids, kernels.select_video(imp, pi, K_V, kernels.advance_rng(rng.clone())))
    # π = 1 on every candidate prunes all of them: exactly the 392 non-candidates remain and are drawn
    ids_all = kernels.select_video(imp, cand.float(), K_V, rng)
    assert torch.equal(ids_all, (~cand).nonzero()[:, 1].view(B, K_V))
    # first step: deterministic top-k, π ignored
    first = kernels.select_video(imp, None, K_V, rng, deterministic=True)
    assert torch.equal(first, imp.topk(K_V, dim=1).indices.sort(dim=1).values)
    _valid(kernels.select_video_ref(imp.cpu(), pi.cpu(), K_V, kernels.new_rng(0)), B, K_V, L_V)


def test_select_audio_step(device):
    B = 3
    imp = _importance(B, L_A, device, 2)
    cand = kernels.topk_mask(imp, K_A)
    rng = kernels.new_rng(1, device)
    ids = kernels.select_audio(imp, torch.full_like(imp, 0.3) * cand, K_A, rng)
    _valid(ids, B, K_A, L_A)
    # π = 1 on the 256 candidates leaves exactly 256 unpruned patches: all of them are kept
    ids_all = kernels.select_audio(imp, cand.float(), K_A, rng)
    assert torch.equal(ids_all, (~cand).nonzero()[:, 1].view(B, K_A))
    # no pruning: 8 whole chunks of 4 time steps x 8 bands
    chunks = kernels.select_audio(imp, torch.zeros_like(imp), K_A, rng).view(B, 8, 32)
    assert torch.all(chunks[:, :, 0] % 32 == 0) and torch.all(chunks.diff(dim=2) == 1)
    first = kernels.select_audio(imp, None, K_A, rng, deterministic=True)
    assert torch.equal(first, imp.topk(K_A, dim=1).indices.sort(dim=1).values)
    ref = kernels.select_audio_ref(imp.cpu(), cand.cpu().float(), K_A, kernels.new_rng(1))
    assert torch.equal(ref, ids_all.cpu())


def test_select_requires_pi_unless_deterministic(device):
    imp = _importance(1, L_V, device, 0)
    with pytest.raises(ValueError, match="pi must have the importance shape"):
        kernels.select_video(imp, None, K_V, kernels.new_rng(0, device))
    with pytest.raises(ValueError, match=r"\(1, 784\).*\(1, 512\)"):
        kernels.select_audio(imp, imp[:, :512], K_A, kernels.new_rng(0, device))


def _stella_step(inp: dict[str, torch.Tensor], rng: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything between the AVM's Q/K and the gathered patches of one STELLA step (docs/methods/stella.md)."""
    scale, tau = 0.125, 0.4
    i_v = kernels.attention_importance(inp["q_a"], inp["k_v"], scale, tau)
    i_a = kernels.attention_importance(inp["q_v"], inp["k_a"], scale, tau)
    c_v, c_a = kernels.topk_mask(i_v, K_V), kernels.topk_mask(i_a, K_A)
    qbar_a = kernels.pooled_query(inp["q_a"], i_a, c_a)
    qbar_v = kernels.pooled_query(inp["q_v"], i_v, c_v)
    pi_v = kernels.replay_correlation(inp["past_q_a"], qbar_a, inp["k_v"], scale, c_v)
    pi_a = kernels.replay_correlation(inp["past_q_v"], qbar_v, inp["k_a"], scale, c_a)
    vid = kernels.select_video(torch.cat([i_v, inp["r_i_v"]]), torch.cat([pi_v, inp["r_pi_v"]]), K_V, rng)
    aud = kernels.select_audio(torch.cat([i_a, inp["r_i_a"]]), torch.cat([pi_a, inp["r_pi_a"]]), K_A, rng)
    v = kernels.gather_video_patches(inp["video"], vid)
    a = kernels.gather_audio_patches(inp["fbank"], aud)
    kernels.advance_rng(rng)
    return v, a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stella_step_selection_makes_no_host_sync():
    """The whole selection path under torch.cuda.set_sync_debug_mode("error") (after a warm-up that autotunes)."""
    B, H, D, dev, bf = 12, 12, 64, "cuda", torch.bfloat16
    inp = {
        "q_a": torch.randn(B, H, L_A, D, device=dev, dtype=bf),
        "k_a": torch.randn(B, H, L_A, D, device=dev, dtype=bf),
        "q_v": torch.randn(B, H, L_V, D, device=dev, dtype=bf),
        "k_v": torch.randn(B, H, L_V, D, device=dev, dtype=bf),
        "past_q_a": torch.randn(B, H, D, device=dev),
        "past_q_v": torch.randn(B, H, D, device=dev),
        "r_i_v": torch.rand(B, L_V, device=dev).softmax(-1),
        "r_i_a": torch.rand(B, L_A, device=dev).softmax(-1),
        "r_pi_v": torch.rand(B, L_V, device=dev) * 0.5,
        "r_pi_a": torch.rand(B, L_A, device=dev) * 0.5,
        "video": torch.randn(2 * B, 4, 3, 224, 224, device=dev, dtype=bf),
        "fbank": torch.randn(2 * B, 1024, 128, device=dev, dtype=bf),
    }
    rng = kernels.new_rng(0, dev)
    with kernels.use_backend("triton"):
        _stella_step(inp, rng)  # compile + autotune (these synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            v, a = _stella_step(inp, rng)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert v.shape == (2 * B, K_V, 768) and a.shape == (2 * B, K_A, 256)
    assert rng.tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------------------------
# no host reads on the selection path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_stella_step_selection_reads_nothing_on_the_host(backend, device, host_reads):
    B, H, D = 2, 3, 16
    inp = {
        "q_a": torch.randn(B, H, L_A, D),
        "k_a": torch.randn(B, H, L_A, D),
        "q_v": torch.randn(B, H, L_V, D),
        "k_v": torch.randn(B, H, L_V, D),
        "past_q_a": torch.randn(B, H, D),
        "past_q_v": torch.randn(B, H, D),
        "r_i_v": torch.rand(B, L_V).softmax(-1),
        "r_i_a": torch.rand(B, L_A).softmax(-1),
        "r_pi_v": torch.rand(B, L_V) * 0.5,
        "r_pi_a": torch.rand(B, L_A) * 0.5,
        "video": torch.randn(2 * B, 4, 3, 224, 224),
        "fbank": torch.randn(2 * B, 1024, 128),
    }
    inp = {name: t.to(device) for name, t in inp.items()}
    rng = kernels.new_rng(3, device)
    with kernels.use_backend(backend), host_reads() as rec:
        v, a = _stella_step(inp, rng)
    assert not rec.calls, f"host reads on the {backend} selection path: {dict(rec.calls)}"
    assert v.shape == (2 * B, K_V, 768) and a.shape == (2 * B, K_A, 256)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_stella_step_selection_on_fake_cuda(backend, device_syncs, fake_cuda, monkeypatch):
    """The selection path at STELLA's sizes on fake CUDA tensors (no GPU): no copy between host and device, no read
    of a device value. On the "triton" backend the launches are recorded instead of run (fake tensors hold no
    data), which checks the host code around every kernel, and that no kernel argument lives on the host."""
    launched: list[tuple[str, list[int]]] = []

    def record(self, grid, args, constexprs, interp_meta):
        host_args = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.device.type != "cuda"]
        launched.append((self.name, host_args))

    monkeypatch.setattr(kernels._utils.Launcher, "__call__", record)
    B, H, D, bf = 2, 12, 64, torch.bfloat16
    with fake_cuda():
        inp = {
            "q_a": torch.randn(B, H, L_A, D, device="cuda", dtype=bf),
            "k_a": torch.randn(B, H, L_A, D, device="cuda", dtype=bf),
            "q_v": torch.randn(B, H, L_V, D, device="cuda", dtype=bf),
            "k_v": torch.randn(B, H, L_V, D, device="cuda", dtype=bf),
            "past_q_a": torch.randn(B, H, D, device="cuda"),
            "past_q_v": torch.randn(B, H, D, device="cuda"),
            "r_i_v": torch.rand(B, L_V, device="cuda"),
            "r_i_a": torch.rand(B, L_A, device="cuda"),
            "r_pi_v": torch.rand(B, L_V, device="cuda"),
            "r_pi_a": torch.rand(B, L_A, device="cuda"),
            "video": torch.randn(2 * B, 4, 3, 224, 224, device="cuda", dtype=bf),
            "fbank": torch.randn(2 * B, 1024, 128, device="cuda", dtype=bf),
        }
        rng = kernels.new_rng(3, "cuda")  # made once per run (a host literal copied in); steps only advance it
        with kernels.use_backend(backend), device_syncs() as rec:
            v, a = _stella_step(inp, rng)
    assert not rec.where, f"{backend} selection path: {rec.report()}"
    assert v.shape == (2 * B, K_V, 768) and a.shape == (2 * B, K_A, 256) and v.device.type == "cuda"
    if backend == "triton":
        names = {name for name, _ in launched}
        assert names == {
            "_row_stats_kernel", "_col_accum_kernel", "_pooled_query_kernel", "_replay_correlation_kernel",
            "_rank_select_kernel", "_bernoulli_kernel", "_chunk_select_kernel", "_gather_patches_kernel",
        }  # fmt: skip
        assert not [entry for entry in launched if entry[1]], f"host tensors passed to kernels: {launched}"
    else:
        assert not launched
