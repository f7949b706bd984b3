"""STELLA's AVM module (projections for the kernels, matching head, deranged negatives) and the fine-tuning model."""

from __future__ import annotations

import pytest
import torch

from fastav.config import load_config
from fastav.models import AVMatching, build_classifier, build_pretrain_model, matching_loss, matching_pairs
from fastav.models.classifier import MODES


def test_projections_expose_q_and_k_per_head_and_logits_match() -> None:
    avm = AVMatching(16, 4)
    e_a, e_v = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    proj = avm.project(e_a, e_v)
    assert proj.q_a.shape == (2, 4, 7, 4) and proj.k_v.shape == (2, 4, 5, 4) and proj.v_v.shape == (2, 4, 5, 4)
    q_a = avm.to_a_q(avm.norm_a(e_a)).reshape(2, 7, 4, 4).transpose(1, 2)
    torch.testing.assert_close(proj.q_a, q_a)
    s_av, s_va = AVMatching.cross_logits(proj)
    assert s_av.shape == (2, 4, 7, 5) and s_va.shape == (2, 4, 5, 7)
    torch.testing.assert_close(s_av, torch.einsum("bhae,bhve->bhav", proj.q_a, proj.k_v) / 2.0)


def test_matching_logits_follow_the_documented_formula() -> None:
    torch.manual_seed(0)
    avm = AVMatching(8, 2)
    e_a, e_v = torch.randn(3, 6, 8), torch.randn(3, 4, 8)
    p = avm.project(e_a, e_v)
    o_a = torch.softmax(p.q_a @ p.k_v.transpose(-2, -1) / 2.0, -1) @ p.v_v  # (B, H, A, E)
    o_v = torch.softmax(p.q_v @ p.k_a.transpose(-2, -1) / 2.0, -1) @ p.v_a
    standard = torch.cat(
        [o_v.transpose(1, 2).reshape(3, 4, 8).mean(1), o_a.transpose(1, 2).reshape(3, 6, 8).mean(1)], 1
    )
    torch.testing.assert_close(avm(e_a, e_v), avm.matching_score(standard), rtol=1e-5, atol=1e-5)
    avm.layout = "official"  # STELLA's reshape without moving the head axis
    official = torch.cat([o_v.reshape(3, 4, 8).mean(1), o_a.reshape(3, 6, 8).mean(1)], 1)
    torch.testing.assert_close(avm(e_a, e_v), avm.matching_score(official), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(standard, official)


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9])
def test_matching_pairs_derange_the_negatives(batch: int) -> None:
    for _ in range(20):
        labels, video_ids = matching_pairs(batch, torch.device("cpu"))
        if batch <= 2:
            assert labels.tolist() == [1.0] * batch and video_ids.tolist() == list(range(batch))
            continue
        neg = (labels == 0).nonzero().flatten()
        assert int(labels.sum()) == batch // 2 and len(neg) == batch - batch // 2
        assert (video_ids[neg] != neg).all() and set(video_ids[neg].tolist()) == set(neg.tolist())
        pos = (labels == 1).nonzero().flatten()
        assert torch.equal(video_ids[pos], pos)


def test_matching_loss_trains_the_avm_through_the_joint_layers() -> None:
    cfg = load_config("debug")
    model = build_pretrain_model(cfg)
    avm = AVMatching(cfg.model.embed_dim, cfg.model.num_heads)
    fbank = torch.randn(4, cfg.data.target_length, cfg.data.num_mel_bins)
    video = torch.randn(4, cfg.data.num_frames, 3, cfg.data.frame_size, cfg.data.frame_size)
    with torch.no_grad():
        z_a, z_v = model.encoder.specific_codes(fbank, video)
    assert z_a.shape == (4, model.grid.audio_tokens, 64) and z_v.shape == (4, model.grid.video_tokens, 64)
    loss, logits, labels = matching_loss(avm, model.encoder.joint_codes, z_a, z_v)
    loss.backward()
    assert logits.shape == (4,) and labels.sum() == 2
    assert avm.to_a_q.weight.grad is not None and avm.matching_score.fc.weight.grad is not None


def test_classifier_modes() -> None:
    cfg = load_config("debug", ["model.embed_dim=32", "model.num_heads=2"])
    model = build_classifier(cfg, num_classes=5)
    fbank = torch.randn(2, cfg.data.target_length, cfg.data.num_mel_bins)
    video = torch.randn(2, cfg.data.num_frames, 3, cfg.data.frame_size, cfg.data.frame_size)
    for mode in MODES:
        assert model(fbank, video, mode=mode).shape == (2, 5)
    enc = model.encoder
    z_a = model.codes(fbank, "a", "audioonly")
    torch.testing.assert_close(model.pooled(fbank, None, "audioonly"), enc.shared(z_a, "a").mean(1))
    both = 0.5 * (enc.shared(z_a, "joint").mean(1) + enc.shared(z_a, "a").mean(1))
    torch.testing.assert_close(model.pooled(fbank, None, "missingaudioonly"), both)
    with pytest.raises(ValueError, match="mode 'multimodal' needs the video input"):
        model(fbank, None)
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'both'"):
        model(fbank, video, mode="both")  # type: ignore[arg-type]
    assert all(p.requires_grad for p in model.parameters())  # positions trainable (CAV-MAE tr_pos=True)
