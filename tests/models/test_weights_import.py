"""Checkpoint import: official CAV-MAE / STELLA state dicts generated here from the documented layouts
(docs/methods/cav_mae.md, docs/methods/stella.md), the ImageNet-MAE adaptation, and fastav's safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastav.config import Config, load_config
from fastav.models import (
    AVMatching,
    CheckpointError,
    adapt_imagenet_mae,
    build_classifier,
    build_pretrain_model,
    export_cavmae,
    export_stella,
    load_cavmae,
    load_stella,
    load_weights,
    patchify_audio,
    save_weights,
)
from fastav.models.weights import config_from_weights

TINY = [
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.specific_depth=1",
    "model.shared_depth=1",
    "model.decoder_dim=8",
    "model.decoder_heads=2",
    "model.decoder_depth=1",
    "data.frame_size=32",
    "data.target_length=64",
    "data.num_mel_bins=32",
]
D, C, P = 16, 8, 16  # widths and patch side of the tiny configs
TP, FP = 4, 2  # audio patches along time and frequency (64 frames x 32 mel bins)
LV = 4  # video patches per frame (32 x 32 pixels)


def cavmae_cfg() -> Config:
    return load_config("debug_cavmae", TINY)


def stella_cfg() -> Config:
    return load_config("debug", [*TINY, "data.num_frames=2"])


def _block(prefix: str, dim: int, tagged: bool) -> dict[str, tuple[int, ...]]:
    shapes = {
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    for norm in ("norm1", "norm2") + (("norm1_a", "norm1_v", "norm2_a", "norm2_v") if tagged else ()):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (dim,)
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


def official_cavmae_shapes() -> dict[str, tuple[int, ...]]:
    """CAVMAE's keys (docs/methods/cav_mae.md): every Block carries three LayerNorm pairs; audio is frequency-major."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed_a.proj.weight": (D, 1, P, P),
        "patch_embed_a.proj.bias": (D,),
        "patch_embed_v.proj.weight": (D, 3, P, P),
        "patch_embed_v.proj.bias": (D,),
        "modality_a": (1, 1, D),
        "modality_v": (1, 1, D),
        "pos_embed_a": (1, FP * TP, D),
        "pos_embed_v": (1, LV, D),
        "decoder_embed.weight": (C, D),
        "decoder_embed.bias": (C,),
        "mask_token": (1, 1, C),
        "decoder_modality_a": (1, 1, C),
        "decoder_modality_v": (1, 1, C),
        "decoder_pos_embed_a": (1, FP * TP, C),
        "decoder_pos_embed_v": (1, LV, C),
        "decoder_pred_a.weight": (P * P, C),
        "decoder_pred_a.bias": (P * P,),
        "decoder_pred_v.weight": (3 * P * P, C),
        "decoder_pred_v.bias": (3 * P * P,),
    }
    for name in ("norm_a", "norm_v", "norm", "decoder_norm"):
        dim = C if name.startswith("decoder") else D
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (dim,)
    for prefix in ("blocks_a.0", "blocks_v.0", "blocks_u.0"):
        shapes.update(_block(prefix, D, tagged=True))
    shapes.update(_block("decoder_blocks.0", C, tagged=True))
    return shapes


def official_stella_shapes(frames: int = 2) -> dict[str, tuple[int, ...]]:
    """STELLA's CAV keys (docs/methods/stella.md, models/cav.py): LayerNorm sets only in the shared blocks, per-modality
    mask tokens, inter_pos_embed, MAE heads as mae_score_*.decoder; audio time-major."""
    shapes = {k: v for k, v in official_cavmae_shapes().items() if "blocks" not in k and "decoder_pred" not in k}
    del shapes["mask_token"]
    shapes.update({"mask_token_a": (1, 1, C), "mask_token_v": (1, 1, C)})
    shapes.update({"pos_embed_v": (1, frames * LV, D), "decoder_pos_embed_v": (1, frames * LV, C)})
    shapes.update({"inter_pos_embed_a": (1, TP * FP, D), "inter_pos_embed_v": (1, frames * LV, D)})
    shapes.update({"mae_score_audio.decoder.weight": (P * P, C), "mae_score_audio.decoder.bias": (P * P,)})
    shapes.update({"mae_score_video.decoder.weight": (3 * P * P, C), "mae_score_video.decoder.bias": (3 * P * P,)})
    for prefix in ("blocks_a.0", "blocks_v.0"):
        shapes.update(_block(prefix, D, tagged=False))
    shapes.update(_block("blocks_u.0", D, tagged=True))
    shapes.update(_block("decoder_blocks.0", C, tagged=False))
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {prefix + k: torch.randn(v, generator=gen) for k, v in shapes.items()}


def test_cavmae_import_has_no_missing_or_unexpected_keys_and_round_trips() -> None:
    official = random_state(official_cavmae_shapes(), "module.")
    model = build_pretrain_model(cavmae_cfg())
    report = load_cavmae(model, official)
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(official)
    exported = export_cavmae(model)
    assert exported.keys() == official.keys()
    assert all(torch.equal(exported[k], official[k]) for k in official)
    # CAVMAEFT: the encoder keys plus mlp_head = Sequential(LayerNorm(D), Linear(D, classes))
    ft_shapes = {k: v for k, v in official_cavmae_shapes().items() if not k.startswith(("decoder", "mask_token"))}
    ft_shapes.update({"mlp_head.0.weight": (D,), "mlp_head.0.bias": (D,), "mlp_head.1.weight": (5, D)})
    ft_shapes["mlp_head.1.bias"] = (5,)
    classifier = build_classifier(cavmae_cfg(), 5)
    report = load_cavmae(classifier, random_state(ft_shapes, "module."))
    assert report.missing == [] and report.unexpected == []
    pretrained = load_cavmae(classifier, official, strict=False)  # pre-training weights into the classifier
    assert sorted(pretrained.missing) == [f"mlp_head.{i}.{w}" for i in (0, 1) for w in ("bias", "weight")]
    assert "module.decoder_embed.weight" in pretrained.unexpected


def test_cavmae_audio_positions_and_patch_embedding_land_in_time_major_order() -> None:
    """Would fail with the frequency-major order: official row f * Tp + t must become row t * Fp + f."""
    official = random_state(official_cavmae_shapes(), "module.")
    t_idx, f_idx = torch.meshgrid(torch.arange(TP), torch.arange(FP), indexing="ij")
    marks = torch.zeros(FP * TP)
    marks[(f_idx * TP + t_idx).flatten()] = (100 * t_idx + f_idx).flatten().float()  # official row f*Tp+t
    official["module.pos_embed_a"] = marks[None, :, None].expand(1, FP * TP, D).clone()
    model = build_pretrain_model(cavmae_cfg())
    load_cavmae(model, official)
    pos = model.encoder.embed_a.pos[0, :, 0]
    assert pos.tolist() == [100.0 * t + f for t in range(TP) for f in range(FP)]

    # the whole audio token embedding against CAV-MAE's forward: conv over the transposed (B, 1, F, T) input
    fbank = torch.randn(2, TP * P, FP * P)
    ref = F.conv2d(
        fbank[:, None].transpose(2, 3), official["module.patch_embed_a.proj.weight"],
        official["module.patch_embed_a.proj.bias"], stride=P,
    ).flatten(2).transpose(1, 2)  # fmt: skip
    ref = ref + official["module.pos_embed_a"] + official["module.modality_a"]  # (B, Fp*Tp, D), f-major
    mine = model.encoder.embed(patchify_audio(fbank, P), "a")  # (B, Tp*Fp, D), t-major
    perm = (f_idx * TP + t_idx).flatten()  # canonical row t*Fp+f <- official row f*Tp+t
    torch.testing.assert_close(mine, ref[:, perm], rtol=1e-5, atol=1e-5)


def test_cavmae_audio_head_rows_are_reordered_to_dt_df() -> None:
    official = random_state(official_cavmae_shapes(), "module.")
    model = build_pretrain_model(cavmae_cfg())
    load_cavmae(model, official)
    hidden = torch.randn(3, C)
    theirs = hidden @ official["module.decoder_pred_a.weight"].t() + official["module.decoder_pred_a.bias"]
    mine = model.decoder.pred_a(hidden)
    dt, df = 5, 11
    torch.testing.assert_close(mine[:, dt * P + df], theirs[:, df * P + dt])  # official patches are (df, dt)


def test_stella_import_backbone_and_avm(tmp_path: Path) -> None:
    backbone = random_state(official_stella_shapes(), "module.backbone.transformer.")
    avm_ref = AVMatching(D, 2)
    avm_sd = {f"module.avmatching_module.{k}": torch.randn_like(v) for k, v in avm_ref.state_dict().items()}
    path = tmp_path / "stella.pth"
    torch.save({"model": {**backbone, **avm_sd}}, path)
    model, avm = build_pretrain_model(stella_cfg()), AVMatching(D, 2)
    report = load_stella(model, path, avm=avm)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(avm.to_v_q.weight, avm_sd["module.avmatching_module.to_v_q.weight"])
    fbank = torch.randn(2, TP * P, FP * P)  # STELLA is time-major already: conv over (B, 1, T, F)
    w, b = (
        backbone["module.backbone.transformer.patch_embed_a.proj.weight"],
        backbone["module.backbone.transformer.patch_embed_a.proj.bias"],
    )
    ref = F.conv2d(fbank[:, None], w, b, stride=P).flatten(2).transpose(1, 2)
    ref = ref + backbone["module.backbone.transformer.pos_embed_a"] + backbone["module.backbone.transformer.modality_a"]
    torch.testing.assert_close(model.encoder.embed(patchify_audio(fbank, P), "a"), ref, rtol=1e-5, atol=1e-5)
    exported = export_stella(model, avm)
    assert exported.keys() == {**backbone, **avm_sd}.keys()


def test_bad_checkpoints_raise_errors_naming_the_key(tmp_path: Path) -> None:
    official = random_state(official_cavmae_shapes(), "module.")
    model = build_pretrain_model(cavmae_cfg())
    wrong = dict(official, **{"module.pos_embed_v": torch.zeros(1, 9, D)})
    with pytest.raises(CheckpointError, match=r"key 'module.pos_embed_v' has shape \(1, 9, 16\).*needs \(1, 4, 16\)"):
        load_cavmae(model, wrong)
    with pytest.raises(CheckpointError, match="foreign checkpoint: none of its 1 keys \\(e.g. 'encoder.fc.weight'\\)"):
        load_cavmae(model, {"encoder.fc.weight": torch.zeros(2, 2)})
    partial = {k: v for k, v in official.items() if k != "module.norm_a.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['encoder.norm_a.bias'\]"):
        load_cavmae(model, partial)
    assert load_cavmae(model, partial, strict=False).missing == ["encoder.norm_a.bias"]
    stella_model = build_pretrain_model(load_config("debug", [*TINY, "data.num_frames=1"]))
    with pytest.raises(CheckpointError, match="model.tagged_norms=all"):
        load_stella(stella_model, {"module.backbone.transformer." + k[7:]: v for k, v in official.items()})
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": official, "args": Path("/somewhere")}, pickled)
    with pytest.raises(CheckpointError, match="weights_only=True refused it"):
        load_cavmae(model, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_weights(model, pickled)


def _mae_state(depth: int, frames_unused: int = 1) -> dict[str, torch.Tensor]:
    """An ImageNet MAE ViT + decoder state dict at the tiny widths (MAE's key names)."""
    gen = torch.Generator().manual_seed(3)
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + LV, D),
        "patch_embed.proj.weight": (D, 3, P, P),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
        "mask_token": (1, 1, C),
        "decoder_embed.weight": (C, D),
        "decoder_embed.bias": (C,),
        "decoder_pos_embed": (1, 1 + LV, C),
        "decoder_norm.weight": (C,),
        "decoder_norm.bias": (C,),
        "decoder_pred.weight": (3 * P * P, C),
        "decoder_pred.bias": (3 * P * P,),
    }
    for i in range(depth):
        shapes.update(_block(f"blocks.{i}", D, tagged=False))
    shapes.update(_block("decoder_blocks.0", C, tagged=False))
    return {k: torch.randn(v, generator=gen) for k, v in shapes.items()}


def test_imagenet_mae_adaptation_cavmae_layout() -> None:
    mae = _mae_state(depth=2)
    model = build_pretrain_model(cavmae_cfg())
    report = adapt_imagenet_mae(model, mae, "cavmae")
    assert report.unexpected == ["cls_token"]
    assert {"encoder.embed_a.modality", "encoder.embed_a.pos", "decoder.pos_embed_a"} <= set(report.missing)
    enc = model.encoder
    for branch in (enc.blocks_a, enc.blocks_v):
        assert torch.equal(branch[0].attn.qkv.weight, mae["blocks.0.attn.qkv.weight"])
    assert torch.equal(enc.blocks_u[0].norm1_a.weight, mae["blocks.1.norm1.weight"])
    assert torch.equal(enc.blocks_u[0].norm2_v.bias, mae["blocks.1.norm2.bias"])
    assert torch.equal(enc.norm_v.weight, mae["norm.weight"])
    assert torch.equal(enc.embed_v.pos, mae["pos_embed"][:, 1:])
    rgb_sum = mae["patch_embed.proj.weight"].sum(dim=1)  # (D, kh, kw); CAV-MAE's kernel spans (F, T)
    dt, df = 3, 9
    torch.testing.assert_close(enc.embed_a.proj.weight[:, dt * P + df], rgb_sum[:, df, dt])
    torch.testing.assert_close(model.decoder.pred_a.weight[dt * P + df], mae["decoder_pred.weight"][df * P + dt])
    assert torch.equal(model.decoder.mask_token, mae["mask_token"])


def test_imagenet_mae_adaptation_stella_layout() -> None:
    mae = _mae_state(depth=2)
    model = build_pretrain_model(stella_cfg())
    adapt_imagenet_mae(model, mae, "stella")
    enc, dec = model.encoder, model.decoder
    assert torch.equal(enc.embed_v.pos, mae["pos_embed"][:, 1:].repeat(1, 2, 1))  # repeated over the 2 frames
    assert torch.equal(dec.pos_embed_v, mae["decoder_pos_embed"][:, 1:].repeat(1, 2, 1))
    assert torch.equal(dec.mask_token_a, mae["mask_token"]) and torch.equal(dec.mask_token_v, mae["mask_token"])
    rgb_sum = mae["patch_embed.proj.weight"].sum(dim=1)  # STELLA's kernel spans (T, F)
    torch.testing.assert_close(enc.embed_a.proj.weight.reshape(D, P, P), rgb_sum)
    torch.testing.assert_close(dec.pred_a.weight, mae["decoder_pred.weight"][: P * P])
    with pytest.raises(CheckpointError, match=r"MAE checkpoint has 3 blocks .* 1 \+ 1"):
        adapt_imagenet_mae(model, _mae_state(depth=3), "stella")


def test_safetensors_round_trip(tmp_path: Path) -> None:
    cfg = stella_cfg()
    model = build_pretrain_model(cfg)
    path = save_weights(model, tmp_path / "w.safetensors", config=cfg)
    fresh = build_pretrain_model(cfg)
    report = load_weights(fresh, path)
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert config_from_weights(path) == cfg
    bigger = build_pretrain_model(load_config("debug", [*TINY[1:], "data.num_frames=2", "model.embed_dim=32"]))
    with pytest.raises(
        CheckpointError, match=r"key 'decoder.embed.weight' has shape \(8, 16\), the model needs \(8, 32"
    ):
        load_weights(bigger, path)
