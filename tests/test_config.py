"""Typed configuration: recipes, overrides with type conversion, and every validation error path."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fastav.config import (
    DATA_ENV,
    RECIPES,
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    explain,
    field_docs,
    load_config,
    main,
)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_build_validate_and_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert cfg.recipe == name
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg


def test_recipes_differ_from_base_in_the_documented_way() -> None:
    cav, stella, dbg = load_config("cavmae_base"), load_config("stella_vggsound"), load_config("debug")
    assert (cav.model.specific_depth, cav.model.shared_depth, cav.data.num_frames) == (11, 1, 1)
    assert (cav.model.contrastive_weight, cav.model.mask_ratio_a, cav.train.lr) == (0.01, 0.75, 5e-5)
    assert (stella.model.specific_depth, stella.model.shared_depth, stella.data.num_frames) == (10, 2, 4)
    assert stella.continual.task_order[0] == "sports" and len(stella.continual.task_order) == 8
    assert load_config("stella_audioset").data.batch_size == 9
    assert dbg.model.embed_dim < 128 and dbg.train.precision == "fp32"
    small_cav = load_config("debug_cavmae")
    sizes = ("embed_dim", "num_heads", "specific_depth", "shared_depth", "decoder_dim", "decoder_depth")
    assert dataclasses.replace(small_cav.model, **{k: getattr(cav.model, k) for k in sizes + ("decoder_heads",)}) == (
        cav.model
    )
    assert all(getattr(small_cav.model, k) == getattr(dbg.model, k) for k in sizes)
    assert (small_cav.data.sampling, small_cav.data.num_frames, small_cav.train) == ("cavmae", 1, dbg.train)


def test_every_field_has_a_docstring() -> None:
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{name}: fields without a docstring: {missing}"
    assert "train.lr = 0.0001" in explain(load_config("base"))


def test_overrides_convert_types() -> None:
    cfg = load_config(
        "debug",
        [
            "train.lr=3e-4",
            "data.batch_size=16",
            "train.tensorboard=yes",
            "model.norm_pix_loss=false",
            "train.betas=0.9, 0.98",
            "continual.task_order=music,sports",
            "model.attention=xformers",
            "eval.retrieval_ks=1,10",
            "data.batch_size=4",  # later wins
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.batch_size == 4
    assert cfg.train.tensorboard is True and cfg.model.norm_pix_loss is False
    assert cfg.train.betas == (0.9, 0.98)
    assert cfg.continual.task_order == ("music", "sports")
    assert cfg.model.attention == "xformers"
    assert cfg.eval.retrieval_ks == (1, 10)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trian.lr=1", "unknown section 'trian' (did you mean train?)"),
        ("train.lrr=1", "unknown field of 'train' 'lrr' (did you mean train.lr?)"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.lr=nan", "train.lr: expected a finite number"),
        ("data.batch_size=2.5", "data.batch_size: expected an integer, got '2.5'"),
        ("train.tensorboard=maybe", "train.tensorboard: expected true or false, got 'maybe'"),
        ("model.attention=flash", "model.attention: 'flash' is not accepted; choose one of sdpa, xformers"),
        ("eval.retrieval_ks=1,x", "eval.retrieval_ks: expected an integer, got 'x'"),
        ("train.lr", "override 'train.lr': expected section.field=value"),
        ("lr=1", "override 'lr': expected section.field"),
    ],
)
def test_override_errors_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mask_ratio_a=1.0", "model.mask_ratio_a: got 1.0; accepted: a fraction in [0, 1)"),
        ("model.mask_ratio_v=-0.1", "model.mask_ratio_v: got -0.1; accepted: a fraction in [0, 1)"),
        ("method.stella.core_video_ratio=1.5", "method.stella.core_video_ratio: got 1.5"),
        ("method.lump.mix_alpha=0", "method.lump.mix_alpha: got 0.0; accepted: a value > 0"),
        ("data.mixup=1.5", "data.mixup: got 1.5; accepted: a fraction in [0, 1]"),
        ("data.batch_size=0", "data.batch_size: got 0; accepted: a value > 0"),
        ("train.lr=-1", "train.lr: got -1.0; accepted: a value > 0"),
        ("train.weight_decay=-1e-3", "train.weight_decay: got -0.001; accepted: a value >= 0"),
        ("model.num_heads=5", "model.embed_dim: got 64; accepted: a multiple of model.num_heads (5)"),
        ("model.decoder_heads=5", "model.decoder_dim: got 48; accepted: a multiple of model.decoder_heads (5)"),
        ("train.betas=0.9", "train.betas: got (0.9,); accepted: two numbers in [0, 1)"),
        ("train.milestones=10,5", "train.milestones: got (10, 5); accepted: strictly increasing"),
        ("train.schedule=multistep", "train.milestones: got (); accepted: at least one epoch"),
        ("distributed.zero_stage=4", "distributed.zero_stage: got 4; accepted: one of 0, 1, 2, 3"),
        ("continual.task_order=a,b,a", "continual.task_order: got ('a', 'b', 'a'); accepted: each task at most once"),
        ("data.sampling=cavmae", "data.num_frames: got 4; accepted: 1 when data.sampling='cavmae'"),
        ("data.specaug_freq=100", "data.specaug_freq: got 100; accepted: at most data.num_mel_bins (64)"),
        ("eval.retrieval_ks=0", "eval.retrieval_ks: got (0,); accepted: one or more positive integers"),
        ("model.shared_depth=0", "model.avm: got True; accepted: false when model.shared_depth=0"),
    ],
)
def test_validation_errors_name_field_and_accepted_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("debug", [override])
    assert message in str(err.value)


def test_valid_edge_values_pass() -> None:
    load_config("debug", ["method.name=finetune", "method.memory_size=0", "data.mixup=1.0"])
    load_config("debug", ["model.mask_ratio_a=0", "model.shared_depth=0", "model.avm=false"])


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'stela_vggsound' \\(did you mean stella_vggsound\\?\\)"):
        load_config("stela_vggsound")


def test_missing_dataset_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    cfg = load_config("debug")
    with pytest.raises(ConfigError, match=f"data.root: no dataset given; pass data.root=DIR .* or set \\${DATA_ENV}"):
        cfg.validate(require_data=True)
    apply_overrides(cfg, [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="has no manifest.json"):
        cfg.validate(require_data=True)
    (tmp_path / "manifest.json").write_text("{}")
    cfg.validate(require_data=True)
    cfg.data.root = ""
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert cfg.data_root() == str(tmp_path)
    cfg.validate(require_data=True)


def test_save_and_load(tmp_path) -> None:
    cfg = load_config("cavmae_base", ["train.lr=2e-4"])
    path = cfg.save(tmp_path / "run")
    assert path.name == "config.json"
    assert Config.load(path) == cfg
    raw = json.loads(path.read_text())
    raw["train"]["lr"] = "big"
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        Config.from_dict(raw)
    raw["train"]["lr"] = 1e-4
    raw["train"]["epochs"] = 2.5
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got 2.5"):
        Config.from_dict(raw)
    raw["train"]["epochs"] = 2
    raw["optim"] = {}
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        Config.from_dict(raw)


def test_deepspeed_json_is_generated_from_the_config() -> None:
    cfg = load_config("stella_vggsound", ["train.grad_accum=2", "distributed.zero_stage=3", "train.grad_clip=1.0"])
    ds = cfg.deepspeed_config(world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 12
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 12 * 2 * 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in ds["zero_optimization"]
    ds = load_config("debug", ["distributed.offload_optimizer=true"]).deepspeed_config()
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_cli(capsys) -> None:
    assert main(["show", "--recipe", "debug", "train.lr=0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == 0.5
    assert main(["show", "--recipe", "debug", "train.lr=x"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err


def test_nested_sections_take_dotted_overrides_at_any_depth(tmp_path) -> None:
    cfg = load_config("debug", ["method.stella.alpha=0.3", "method.derpp.alpha=0.25", "method.name=derpp"])
    assert (cfg.method.stella.alpha, cfg.method.derpp.alpha, cfg.method.name) == (0.3, 0.25, "derpp")
    cfg.save(tmp_path)
    again = Config.load(tmp_path / "config.json")
    assert again == cfg and again.method.stella.alpha == 0.3
    assert "method.stella.att_temperature = 0.4" in explain(cfg)
    for override, message in [
        ("method.stella.alpah=1", "unknown field of 'method.stella' 'alpah' (did you mean method.stella.alpha?)"),
        ("method.stella=1", "'method.stella': a section, not a value; set its fields: method.stella.core_video_ratio"),
        ("method.name.x=1", "method.name is a value, not a section"),
        ("method.derpp.alpha=-1", "method.derpp.alpha: got -1.0; accepted: a value >= 0"),
        ("method.name=er method.memory_size=0", "method.memory_size: got 0; accepted: > 0 for method.name='er'"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config("debug", override.split())
        assert message in str(err.value), (override, str(err.value))
