"""Fine-tuning methods without a process group: frozen probes, CAV-MAE's head learning rate, backbone loading,
the baselines' outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastav.config import load_config
from fastav.data import build_loader
from fastav.finetune import build_method, load_backbone
from fastav.models import CheckpointError, build_pretrain_model, save_weights
from fastav.models.avmae import AVEncoder
from fastav.models.layers import TokenGrid
from fastav.train.engine import build_optimizer

SMALL = ["data.source=synthetic", "data.synthetic_clips=16", "data.batch_size=4", "data.val_fraction=0.25"]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["linear_probe", "stella_probe"])
def test_frozen_backbone_probe_changes_no_backbone_parameter(name: str) -> None:
    cfg = load_config("debug_finetune", [*SMALL, f"method.name={name}", "model.drop_path=0.2", "train.lr=0.05"])
    method = build_method(cfg)
    encoder = method.model.encoder
    head = method.model.mlp_head if name == "linear_probe" else method.model.head
    before, head_before = _state(encoder), _state(head)
    opt = build_optimizer(method, cfg.train)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in encoder.parameters()}
    method.train()
    assert method.training and not encoder.training  # the frozen backbone stays in eval mode: no stochastic depth
    batch = next(iter(build_loader(cfg, "train")))
    first, second = (method.logits(batch["fbank"], batch["video"])["fused"] for _ in range(2))
    assert torch.equal(first, second)
    for _ in range(3):
        method(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in encoder.parameters())
    head_after = head.state_dict()
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)


def test_cavmae_finetune_head_learning_rate_group() -> None:
    cfg = load_config("debug_finetune", [*SMALL, "method.name=cavmae_ft", "method.classify.head_lr_mult=10"])
    method = build_method(cfg)
    opt = build_optimizer(method, cfg.train)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": pytest.approx(1e-3), "head": pytest.approx(1e-2)}
    head = {id(p) for g in opt.param_groups if g["name"] == "head" for p in g["params"]}
    assert head == {id(p) for p in method.model.mlp_head.parameters()}


def test_load_backbone_from_a_pretraining_weights_file(tmp_path: Path) -> None:
    cfg = load_config("debug", ["data.source=synthetic"])
    torch.manual_seed(3)
    pretrained = build_pretrain_model(cfg)
    path = save_weights(pretrained, tmp_path / "weights.safetensors", config=cfg)
    encoder = AVEncoder(cfg.model, TokenGrid.from_config(cfg))
    line = load_backbone(encoder, load_config("debug", [f"model.init={path}"]))
    assert "encoder tensors loaded" in line
    assert all(torch.equal(v, pretrained.encoder.state_dict()[k]) for k, v in encoder.state_dict().items())
    wider = load_config("debug", [f"model.init={path}", "model.embed_dim=32", "model.num_heads=2"])
    with pytest.raises(CheckpointError, match="does not fit this encoder"):
        load_backbone(AVEncoder(wider.model, TokenGrid.from_config(wider)), wider)


def test_baselines_report_unimodal_and_fused_outputs() -> None:
    common = [*SMALL, "method.mla.encoders=resnet18", "method.mla.resnet_width=4"]
    batch = next(iter(build_loader(load_config("debug_mla", common), "train")))
    for name in ("concat", "ogm_ge", "qmf", "mla"):
        method = build_method(load_config("debug_mla", [*common, f"method.name={name}"]))
        scores = method.predict(batch["fbank"], batch["video"])
        assert {"audio", "video", "fused"} <= set(scores), name
        assert all(torch.allclose(s.sum(dim=1), torch.ones(4)) for s in scores.values())
    concat = build_method(load_config("debug_mla", [*common, "method.name=concat"]))
    concat.eval()
    z_a, z_v = concat.model.features(batch["fbank"], batch["video"])
    fused, o_a, o_v = concat.split_logits(z_a, z_v)
    assert torch.allclose(fused, o_a + o_v, atol=1e-5)  # the halves of the concat head add up to it
    mla = build_method(load_config("debug_mla", [*common, "method.mla.fusion=fixed"]))
    logits = mla.logits(batch["fbank"], batch["video"])
    assert torch.allclose(logits["fused"], 0.55 * logits["audio"] + 0.45 * logits["video"])


def test_ogm_scales_the_dominated_encoders_gradients_only() -> None:
    common = [*SMALL, "method.mla.encoders=resnet18", "method.mla.resnet_width=4", "method.ogm.noise=false"]
    batch = next(iter(build_loader(load_config("debug_mla", common), "train")))
    grads = {}
    for name in ("concat", "ogm_ge"):
        method = build_method(load_config("debug_mla", [*common, f"method.name={name}"]))  # same seed: same weights
        method.train()
        out = method(batch)
        out.loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
        if name == "ogm_ge":
            k = {"audio": out.terms["ogm_k_audio"].item(), "video": out.terms["ogm_k_video"].item()}
    assert min(k.values()) < 1.0 and max(k.values()) == 1.0  # exactly one modality is damped
    for n, g in grads["ogm_ge"].items():
        modality = next((m for m in ("audio", "video") if n.startswith(f"encoders.{m}.")), None)
        scale = k[modality] if modality and g.ndim >= 2 else 1.0
        assert torch.allclose(g, scale * grads["concat"][n], rtol=1e-4, atol=1e-7), n
