"""The config fields issue 5 added (model, train, distributed sections) and the recipes that set them."""

from __future__ import annotations

import dataclasses

import pytest

from fastav.config import ConfigError, DistributedConfig, ModelConfig, TrainConfig, field_docs, load_config

NEW_FIELDS = {
    ModelConfig: ("tagged_norms", "decoder_joint", "gather_negatives", "gather_grad", "avm_layout"),
    TrainConfig: ("resume", "keep_checkpoints"),
    DistributedConfig: ("timeout_minutes",),
}


def test_new_fields_have_docstrings_and_defaults() -> None:
    for cls, names in NEW_FIELDS.items():
        docs = field_docs(cls)
        assert all(docs.get(n) for n in names), cls.__name__
    cfg = load_config("base")
    assert (cfg.model.tagged_norms, cfg.model.decoder_joint, cfg.model.gather_negatives) == ("shared", False, True)
    assert (cfg.model.avm_layout, cfg.train.resume, cfg.train.keep_checkpoints) == ("standard", "", 3)
    assert cfg.distributed.timeout_minutes == 30


def test_cavmae_recipe_uses_the_cavmae_layout() -> None:
    m = load_config("cavmae_base").model
    assert (m.tagged_norms, m.decoder_joint, m.gather_negatives, m.shared_mask_token) == ("all", True, False, True)
    s = load_config("stella_vggsound").model
    assert (s.tagged_norms, s.decoder_joint, s.gather_negatives) == ("shared", False, True)


def test_scratch_recipe_changes_only_the_from_scratch_fields() -> None:
    """``debug_scratch`` is ``debug`` plus the InfoNCE settings of a random start; no faithful recipe uses them."""
    dbg, scratch = load_config("debug"), load_config("debug_scratch")
    nce = {"gather_grad": True, "contrastive_weight": 1.0, "contrastive_tau": 0.2}
    assert scratch.model == dataclasses.replace(dbg.model, **nce)
    assert scratch.train == dataclasses.replace(dbg.train, lr=3e-4, epochs=24)
    assert (scratch.data, scratch.continual, scratch.distributed) == (dbg.data, dbg.continual, dbg.distributed)
    for name in ("base", "debug", "debug_cavmae", "cavmae_base", "stella_vggsound", "stella_audioset"):
        assert load_config(name).model.gather_grad is False, name


def test_new_fields_parse_and_validate() -> None:
    cfg = load_config(
        "debug",
        ["model.tagged_norms=all", "model.avm_layout=official", "train.resume=auto", "distributed.timeout_minutes=5"],
    )
    assert (cfg.model.tagged_norms, cfg.model.avm_layout, cfg.train.resume) == ("all", "official", "auto")
    with pytest.raises(ConfigError, match="model.tagged_norms: 'some' is not accepted"):
        load_config("debug", ["model.tagged_norms=some"])
    with pytest.raises(ConfigError, match="train.keep_checkpoints: got -1; accepted: a value >= 0"):
        load_config("debug", ["train.keep_checkpoints=-1"])
    with pytest.raises(ConfigError, match="distributed.timeout_minutes: got 0; accepted: a value > 0"):
        load_config("debug", ["distributed.timeout_minutes=0"])
    with pytest.raises(ConfigError, match="model.decoder_dim: got 42; accepted: a multiple of 4"):
        load_config("debug", ["model.decoder_dim=42", "model.decoder_heads=2"])
