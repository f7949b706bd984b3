"""STELLA and STELLA+ steps on a debug-size model, without DeepSpeed: the order of a step with hand-set importance,
what goes into the memory, STELLA+'s stored patches, the AVM (its stage and its initialisation), memory sizes, no
host read on either kernel backend, and the same patches from both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from fastav.config import load_config
from fastav.continual import build_method
from fastav.continual.avm_stage import AVMStage, build_avm_stage
from fastav.continual.memory import IMAGENET_MEAN, IMAGENET_STD
from fastav.continual.stella import STELLA, STELLAPlus
from fastav.data import SyntheticAV
from fastav.models import CheckpointError, export_stella, patchify_audio, patchify_video, save_weights
from fastav.models.weights import load_avm
from fastav.train.engine import DistInfo, build_optimizer

CPU = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
B = 4


def _eight_bit(video: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised frames whose pixels are exact 8-bit values (what the loader's frames are)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    pixels = ((video * std + mean) * 255).round().clamp(0, 255) / 255
    return (pixels - mean) / std


def _setup(name: str, *overrides: str):
    cfg = load_config(
        "debug",
        [f"method.name={name}", "method.memory_size=16", f"data.batch_size={B}", "data.source=synthetic",
         "data.synthetic_clips=24", *overrides],
    )  # fmt: skip
    method = build_method(cfg, CPU)
    batches = [{**b, "video": _eight_bit(b["video"])} for b in SyntheticAV(cfg, "train")]
    return cfg, method, batches


def _step(method, batch):
    out = method(batch)
    out.loss.backward()
    method.after_step(batch, out)
    return out


def _record(monkeypatch, obj, name: str, log: list, *, keep_output: bool = True):
    """Wrap ``obj.name`` so every call's arguments (tensors copied as they were at the call) and output are appended
    to ``log``."""
    real = getattr(obj, name)

    def snap(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    def wrapper(*args, **kwargs):
        entry = {"args": tuple(snap(a) for a in args), "kwargs": {k: snap(v) for k, v in kwargs.items()}}
        result = real(*args, **kwargs)
        log.append({**entry, "out": result if keep_output else None})
        return result

    monkeypatch.setattr(obj, name, wrapper)


def test_step_order_with_hand_set_importance(monkeypatch) -> None:
    """Stage by stage with importance set by the test: first step top-k with pi = 0 stored; then pi from the
    one-to-one pairing, pruned video weights never chosen, audio chunks scored from the unpruned importance, replay
    rows redrawn from their stored pi with a fresh rng offset every step, and the memory filled with the unpruned
    I and the current pi. The loss is the plain sum of its terms."""
    cfg, method, batches = _setup("stella")
    grid = method.model.grid
    gen = torch.Generator().manual_seed(5)
    imp_v = (3 * torch.randn(B, grid.video_tokens, generator=gen)).softmax(-1)
    imp_a = (3 * torch.randn(B, grid.audio_tokens, generator=gen)).softmax(-1)
    monkeypatch.setattr(method, "importance", lambda *args: (imp_a, imp_v))
    video_calls, audio_calls, rels, draws, fwd = [], [], [], [], []
    _record(monkeypatch, kernels, "select_video", video_calls)
    _record(monkeypatch, kernels, "select_audio", audio_calls)
    _record(monkeypatch, method, "relations", rels)
    _record(monkeypatch, method, "replay", draws)
    _record(monkeypatch, method.model, "forward_patches", fwd)

    with kernels.use_backend("ref"):
        outs = [_step(method, batch) for batch in batches[:3]]

    # step 0: empty memory -> deterministic top-k of the current rows, pi stored as zeros
    assert draws[0]["out"] is None
    for calls, imp, k in ((video_calls, imp_v, method.k_v), (audio_calls, imp_a, method.k_a)):
        first = calls[0]
        assert first["kwargs"]["deterministic"] and torch.equal(first["args"][0], imp)
        assert torch.equal(first["out"], imp.topk(k, dim=1).indices.sort(dim=1).values)
    store = method.memory.store
    assert torch.equal(store["imp_v"][:B], imp_v) and torch.equal(store["imp_a"][:B], imp_a)
    assert not store["pi_v"][:B].any() and not store["pi_a"][:B].any()

    for step in (1, 2):
        rel, draw = rels[step]["out"], draws[step]["out"]
        assert draw["video"].shape[0] == B  # one replay partner per current clip
        pi_v = kernels.replay_correlation_ref(draw["q_a"], rel.q_a_BHE, rel.k_v_BHVE, rel.scale, rel.cand_v_BV)
        pi_a = kernels.replay_correlation_ref(draw["q_v"], rel.q_v_BHE, rel.k_a_BHAE, rel.scale, rel.cand_a_BA)
        assert not pi_v[~rel.cand_v_BV].any() and float(pi_v[rel.cand_v_BV].min()) > 0  # pi lives on C_v
        v, a = video_calls[step], audio_calls[step]
        rng = v["args"][3]
        assert int(rng[1]) == step  # the kernels' rng advanced once per step: fresh Bernoulli draws every step
        assert not v["kwargs"]["deterministic"] and v["kwargs"]["stream"] == 0
        # video: current I and stored I, current pi and the replayed clips' stored pi (redrawn, not a stored mask)
        assert torch.equal(v["args"][0], torch.cat([imp_v, draw["imp_v"]]))
        assert torch.allclose(v["args"][1], torch.cat([pi_v, draw["pi_v"]]), atol=1e-6)
        pruned_v = kernels.bernoulli_prune_ref(v["args"][1], rng, stream=0)
        assert pruned_v[:B].any() and not pruned_v.gather(1, v["out"]).any()  # zeroed weights are never drawn
        # audio: chunk scores from the unpruned I, the pruned mask beside it
        assert torch.equal(a["args"][0], torch.cat([imp_a, draw["imp_a"]]))
        assert torch.allclose(a["args"][1], torch.cat([pi_a, draw["pi_a"]]), atol=1e-6)
        pruned_a = kernels.bernoulli_prune_ref(a["args"][1], rng, stream=1)
        k_a, times, bands = method.k_a, cfg.method.stella.num_core_audio_times, grid.audio_f
        ids_a, _ = kernels.chunk_select_ref(a["args"][0], pruned_a, k_a, rng, chunk_times=times, freq_patches=bands,
                                            stream=1)  # fmt: skip
        assert torch.equal(a["out"], ids_a)
        wrong, _ = kernels.chunk_select_ref(a["args"][0].masked_fill(pruned_a, 0), pruned_a, k_a, rng,
                                            chunk_times=times, freq_patches=bands, stream=1)  # fmt: skip
        assert not torch.equal(wrong, ids_a)  # scoring the pruned importance would pick other chunks here
        # memory insert: the unpruned I and this step's pi (slots 4..7, then 8..11: the memory is not full)
        slots = slice(B * step, B * (step + 1))
        assert torch.equal(store["imp_v"][slots], imp_v) and torch.equal(store["imp_a"][slots], imp_a)
        assert torch.allclose(store["pi_v"][slots], pi_v, atol=1e-6)
        assert torch.allclose(store["pi_a"][slots], pi_a, atol=1e-6)
        assert torch.equal(store["q_a"][slots], rel.q_a_BHE)
        # the model trains on the gathered selection of current + replayed clips
        patches_a, patches_v = fwd[step]["args"]
        sel_a, sel_v = fwd[step]["kwargs"]["sel_a_BK"], fwd[step]["kwargs"]["sel_v_BK"]
        assert torch.equal(sel_v, v["out"]) and torch.equal(sel_a, a["out"])
        fbank = torch.cat([batches[step]["fbank"], draw["fbank"]])
        video = torch.cat([batches[step]["video"], draw["video"]])
        assert torch.equal(patches_a, patchify_audio(fbank, grid.patch).gather(1, sel_a[..., None].expand(-1, -1, 256)))
        ref_v = patchify_video(video, grid.patch)
        assert torch.equal(patches_v, ref_v.gather(1, sel_v[..., None].expand(-1, -1, ref_v.shape[2])))
        # loss: plain sum; the DER term on the replayed rows only
        out, terms = fwd[step]["out"], outs[step].terms
        mse_a = F.mse_loss(out.pooled_a_BD[B:], draw["pooled_a"])
        der = 0.5 * (mse_a + F.mse_loss(out.pooled_v_BD[B:], draw["pooled_v"]))
        assert torch.allclose(terms["loss_der"], der)
        total = terms["loss_mae_a"] + terms["loss_mae_v"] + 0.1 * terms["loss_nce"] + terms["loss_avm"] + der
        assert torch.allclose(outs[step].loss, total, rtol=1e-5) and float(der.detach()) > 0
        assert torch.equal(store["pooled_a"][slots], out.pooled_a_BD[:B].detach())
    assert float(outs[0].terms["loss_der"]) == 0.0


def test_the_avm_loss_trains_the_avm_only() -> None:
    _, method, batches = _setup("stella")
    with kernels.use_backend("ref"):
        rel = method.relations(batches[0]["fbank"], batches[0]["video"])
        loss, acc = method.avm_loss(rel)
    loss.backward()
    assert all(p.grad is None for p in method.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.avm.parameters())
    assert 0.0 <= float(acc) <= 1.0


def test_stella_plus_replays_stored_patches_unchanged(monkeypatch) -> None:
    _, method, batches = _setup("stella_plus")
    assert isinstance(method, STELLAPlus)
    selects, draws, fwd = [], [], []
    _record(monkeypatch, kernels, "select_video", selects)
    _record(monkeypatch, method, "replay", draws)
    _record(monkeypatch, method.model, "forward_patches", fwd)
    with kernels.use_backend("ref"):
        _step(method, batches[0])
        _step(method, batches[1])
    first_a, first_v = fwd[0]["args"]
    first_ids_a, first_ids_v = fwd[0]["kwargs"]["sel_a_BK"], fwd[0]["kwargs"]["sel_v_BK"]
    stored = {"patches_v", "patches_a", "ids_v", "ids_a", "pooled_a", "pooled_v", "q_a", "q_v"}
    assert set(method.memory.store) == stored  # no clip, no I, no pi
    assert method.memory.store["ids_v"].dtype == torch.int16 and method.memory.store["patches_v"].dtype == torch.uint8
    draw = draws[1]["out"]
    assert selects[1]["args"][0].shape[0] == B  # only the current rows are selected
    patches_a, patches_v = fwd[1]["args"]
    ids_a, ids_v = fwd[1]["kwargs"]["sel_a_BK"], fwd[1]["kwargs"]["sel_v_BK"]
    assert patches_v.shape[0] == 2 * B
    # every replayed row is one clip of step 0, exactly as it was trained on then: patches and positions
    matched = []
    for r in range(B, 2 * B):
        same = [j for j in range(B) if torch.equal(ids_v[r], first_ids_v[j]) and torch.equal(ids_a[r], first_ids_a[j])]
        assert len(same) == 1
        j = same[0]
        matched.append(j)
        assert torch.allclose(patches_v[r], first_v[j], atol=1e-6)  # uint8 storage is exact for 8-bit frames
        assert torch.allclose(patches_a[r], first_a[j], atol=1e-2, rtol=1e-2)  # bf16 storage
        assert torch.equal(patches_a[r], draw["patches_a"][r - B])
    assert sorted(matched) == list(range(B))


def test_memory_bytes_per_clip() -> None:
    """STELLA: uint8 frames, bf16 fbank, fp32 I, pi, queries, embeddings; STELLA+: uint8 / bf16 selected patches,
    int16 positions, queries, embeddings. At base size (on the meta device) and at debug size."""
    sizes = {}
    for recipe in ("stella_vggsound", "debug"):
        for name in ("stella", "stella_plus"):
            cfg = load_config(recipe, [f"method.name={name}"])
            with torch.device("meta"):
                method = build_method(cfg, CPU)
            sizes[recipe, name] = method.bytes_per_clip()
    d, h, e = 768, 12, 64
    shared = 2 * d * 4 + 2 * h * e * 4
    assert sizes["stella_vggsound", "stella"] == 4 * 3 * 224 * 224 + 1024 * 128 * 2 + shared + 2 * (784 + 512) * 4
    assert sizes["stella_vggsound", "stella_plus"] == 392 * 768 + 256 * 256 * 2 + (392 + 256) * 2 + shared
    assert (sizes["stella_vggsound", "stella"], sizes["stella_vggsound", "stella_plus"]) == (886_912, 445_712)
    assert (sizes["debug", "stella"], sizes["debug", "stella_plus"]) == (83_968, 42_112)


def test_avm_init_loads_a_stage_file_or_an_official_checkpoint(tmp_path) -> None:
    cfg, method, _ = _setup("stella")
    trained = method.avm
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    save_weights(trained, tmp_path / "avm.safetensors")
    torch.save({"model": export_stella(method.model, trained)}, tmp_path / "official.pth")
    for path in (tmp_path / "avm.safetensors", tmp_path / "official.pth"):
        _, other, _ = _setup("stella", f"method.stella.avm_init={path}")
        for (name, a), b in zip(trained.state_dict().items(), other.avm.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    torch.save({"model": export_stella(method.model)}, tmp_path / "backbone_only.pth")
    with pytest.raises(CheckpointError, match="no AVM in this checkpoint"):
        load_avm(trained, tmp_path / "backbone_only.pth")


def test_avm_stage_freezes_the_backbone() -> None:
    cfg = load_config("debug", ["data.source=synthetic", "data.synthetic_clips=24", f"data.batch_size={B}"])
    stage = build_avm_stage(cfg)
    assert isinstance(stage, AVMStage)
    optimizer = build_optimizer(stage, cfg.train)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in stage.avm.parameters()}  # the backbone has no optimizer state
    out = stage(next(iter(SyntheticAV(cfg, "train"))))
    out.loss.backward()
    assert all(p.grad is None for p in stage.model.parameters())
    assert set(out.terms) == {"loss", "loss_avm", "avm_acc"} and stage.extra_weights() == {"avm": stage.avm}


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("name", ["stella", "stella_plus"])
def test_a_whole_step_reads_nothing_on_the_host(name: str, backend: str, host_reads) -> None:
    """First step (empty memory, top-k) and a replay step: forward, backward, memory insert, gauges."""
    _, method, batches = _setup(name)
    with kernels.use_backend(backend), host_reads() as rec:
        for batch in batches[:2]:
            _step(method, batch)
            method.gauges()
    assert not rec.calls, dict(rec.calls)
    assert method.memory.filled == 2 * B


def test_both_backends_select_the_same_patches() -> None:
    _, method, batches = _setup("stella")
    assert isinstance(method, STELLA)
    fbank, video = batches[1]["fbank"], batches[1]["video"]
    results = {}
    for backend in ("ref", "triton"):
        with kernels.use_backend(backend):
            rel0 = method.relations(batches[0]["fbank"], batches[0]["video"])
            first = method.select(rel0, batches[0]["fbank"], batches[0]["video"], None)
        results[backend, "first"] = (first.ids_a_RK, first.ids_v_RK)
    method.memory.insert({"video": batches[0]["video"], "fbank": batches[0]["fbank"],
                          **method.memory_items(rel0, first, torch.randn(B, 64), torch.randn(B, 64), B)})  # fmt: skip
    state, rng = method.memory.generator.get_state(), method.rng.clone()
    for backend in ("ref", "triton"):
        method.memory.generator.set_state(state)
        method.rng.copy_(rng)
        with kernels.use_backend(backend):
            draw = method.replay(B)
            rel = method.relations(fbank, video)
            sel = method.select(rel, fbank, video, draw)
        results[backend] = (rel, sel)
    assert all(torch.equal(a, b) for a, b in zip(results["ref", "first"], results["triton", "first"], strict=True))
    (rel_r, sel_r), (rel_t, sel_t) = results["ref"], results["triton"]
    assert torch.allclose(rel_r.imp_v_BV, rel_t.imp_v_BV, atol=1e-6)
    assert torch.allclose(rel_r.q_a_BHE, rel_t.q_a_BHE, atol=1e-5)
    assert torch.allclose(sel_r.pi_v_BV, sel_t.pi_v_BV, atol=1e-6) and float(sel_r.pi_v_BV.max()) > 0
    assert torch.equal(sel_r.ids_v_RK, sel_t.ids_v_RK) and torch.equal(sel_r.ids_a_RK, sel_t.ids_a_RK)
    assert torch.equal(sel_r.patches_v_RKP, sel_t.patches_v_RKP)
    assert torch.equal(sel_r.patches_a_RKP, sel_t.patches_a_RKP)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["stella", "stella_plus"])
def test_a_whole_step_makes_no_host_sync_on_a_gpu(name: str) -> None:
    """Compiled kernels, bf16 model: two warm-up steps (compilation, autotuning, the rng and constants made on the
    device), then two steps under torch.cuda.set_sync_debug_mode("error")."""
    cfg = load_config("debug", [f"method.name={name}", "method.memory_size=48", "data.batch_size=12",
                                "data.source=synthetic", "data.synthetic_clips=48"])  # fmt: skip
    method = build_method(cfg, DistInfo(0, 1, 0, torch.device("cuda"), "nccl")).cuda().to(torch.bfloat16)
    batches = [{k: v.cuda() for k, v in b.items()} for b in SyntheticAV(cfg, "train")]
    with kernels.use_backend("triton"):
        for batch in batches[:2]:
            _step(method, batch)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches[2:4]:
                _step(method, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert method.memory.filled == 4 * 12
