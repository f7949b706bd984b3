"""Weights in and out: official CAV-MAE and STELLA checkpoints, the ImageNet-MAE initialisation, fastav safetensors.

Every import goes through an explicit key map (official name -> fastav name, with a transform where the layouts
differ), checks every shape before touching the model, and returns a :class:`LoadReport` of loaded / missing /
unexpected keys. A foreign file (no key of the expected family), a wrong-shaped tensor or, with ``strict``, a
missing or unexpected key raises :class:`CheckpointError` naming the key. Pickled checkpoints are read with
``torch.load(..., weights_only=True)``; fastav's own weights are safetensors files (:func:`save_weights`).

Layout conversions (official -> canonical, see :mod:`fastav.models.layers`):

- CAV-MAE audio is frequency-major over the transposed ``(B, 1, F, T)`` input: ``pos_embed_a`` and
  ``decoder_pos_embed_a`` rows ``f * Tp + t`` are reordered to ``t * Fp + f``; the audio conv weight
  ``(D, 1, df, dt)`` becomes a Linear over ``(dt, df)`` patch vectors; ``decoder_pred_a`` output rows
  ``(df, dt)`` are reordered to ``(dt, df)``.
- STELLA audio is already time-major ``(B, 1, T, F)``: its conv weight ``(D, 1, dt, df)`` is only flattened.
- Video conv weights ``(D, 3, p, q)`` of both become a Linear over ``(p, q, c)`` patch vectors.

Key families: CAV-MAE checkpoints are ``torch.nn.DataParallel`` state dicts (``module.`` prefix; ``CAVMAE`` keys,
or ``CAVMAEFT`` keys with ``mlp_head``). STELLA checkpoints hold the backbone under
``module.backbone.transformer.`` (or without ``module.``, or ``transformer.``) and the AVM under
``module.avmatching_module.``, optionally inside a ``{"model": ...}`` dict; its MAE heads are
``mae_score_audio.decoder`` / ``mae_score_video.decoder``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fastav.config import Config

Family = Literal["cavmae", "stella"]
Source = str | os.PathLike | Mapping[str, Any]

FORMAT = "fastav-weights"
FORMAT_VERSION = "1"
HARMLESS_EXTRAS = ("cls_token_a", "cls_token_v", "cls_token_av")
"""Unused attributes CAV-MAE's ImageNet adaptation attaches; never an error."""


class CheckpointError(ValueError):
    """A checkpoint is foreign, holds a wrong-shaped tensor, or (strict) lacks or adds keys; the message names them."""


@dataclass
class LoadReport:
    source: str
    family: str
    loaded: list[str] = field(default_factory=list)
    """fastav keys set from the file."""
    missing: list[str] = field(default_factory=list)
    """fastav keys the file did not provide (they keep their current values)."""
    unexpected: list[str] = field(default_factory=list)
    """File keys that map to nothing in the model."""

    def __str__(self) -> str:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        lines = [f"{self.source} ({self.family}): {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing (kept): {some(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {some(self.unexpected)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def read_state_dict(source: Source) -> tuple[dict[str, Tensor], str]:
    """A flat ``{key: tensor}`` dict and a name for messages, from a path (pickle or safetensors) or a mapping.

    Pickles are loaded with ``weights_only=True``; a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is
    unwrapped.
    """
    if isinstance(source, Mapping):
        raw: Any = dict(source)
        name = "<state dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle errors of many types; the message says what was refused
                raise CheckpointError(
                    f"{path}: not a plain tensor checkpoint (torch.load with weights_only=True refused it: {err})"
                ) from err
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name}: expected a dict of tensors, got {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{name}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return dict(raw), name


# ---------------------------------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------------------------------

Transform = Callable[[Tensor], Tensor]


@dataclass
class Rule:
    fastav: str
    official: str
    to_fastav: Transform | None = None
    to_official: Transform | None = None


_COMMON_PREFIXES = [
    ("encoder.embed_a.proj.", "patch_embed_a.proj."),
    ("encoder.embed_v.proj.", "patch_embed_v.proj."),
    ("encoder.embed_a.pos", "pos_embed_a"),
    ("encoder.embed_v.pos", "pos_embed_v"),
    ("encoder.embed_a.modality", "modality_a"),
    ("encoder.embed_v.modality", "modality_v"),
    ("encoder.inter_pos_a.weight", "inter_pos_embed_a"),
    ("encoder.inter_pos_v.weight", "inter_pos_embed_v"),
    ("encoder.", ""),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pos_embed_", "decoder_pos_embed_"),
    ("decoder.modality_", "decoder_modality_"),
    ("decoder.mask_token", "mask_token"),
    ("mlp_head.", "mlp_head."),
]
_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "cavmae": [*_COMMON_PREFIXES, ("decoder.pred_a.", "decoder_pred_a."), ("decoder.pred_v.", "decoder_pred_v.")],
    "stella": [
        *_COMMON_PREFIXES,
        ("decoder.pred_a.", "mae_score_audio.decoder."),
        ("decoder.pred_v.", "mae_score_video.decoder."),
    ],
}


def official_name(fastav_key: str, family: Family) -> str:
    """The official key of a fastav parameter name (without ``module.`` / backbone prefixes)."""
    for mine, theirs in _PREFIXES[family]:
        if fastav_key.startswith(mine):
            return theirs + fastav_key[len(mine) :]
    raise KeyError(f"{fastav_key!r} has no {family} counterpart")


def _grid_of(model: nn.Module) -> Any:
    grid = getattr(model, "grid", None)
    if grid is None:
        raise TypeError(f"{type(model).__name__} has no token grid; pass an AVMAE or AVClassifier")
    return grid


def key_map(model: nn.Module, family: Family) -> list[Rule]:
    """Every parameter of ``model`` (an AVMAE or AVClassifier) with its official name and layout transforms."""
    grid = _grid_of(model)
    p, Tp, Fp = grid.patch, grid.audio_t, grid.audio_f
    rules = []
    for key in model.state_dict():
        rule = Rule(key, official_name(key, family))
        if key == "encoder.embed_v.proj.weight":
            rule.to_fastav = lambda w: w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
            rule.to_official = lambda w: w.reshape(w.shape[0], p, p, 3).permute(0, 3, 1, 2)
        elif key == "encoder.embed_a.proj.weight" and family == "stella":
            rule.to_fastav = lambda w: w.reshape(w.shape[0], -1)
            rule.to_official = lambda w: w.reshape(w.shape[0], 1, p, p)
        elif key == "encoder.embed_a.proj.weight":  # CAV-MAE: conv over (F, T) -> Linear over (dt, df)
            rule.to_fastav = lambda w: w[:, 0].transpose(1, 2).reshape(w.shape[0], -1)
            rule.to_official = lambda w: w.reshape(w.shape[0], p, p).transpose(1, 2)[:, None]
        elif family == "cavmae" and key in ("encoder.embed_a.pos", "decoder.pos_embed_a"):
            rule.to_fastav = lambda x: x.reshape(1, Fp, Tp, x.shape[-1]).transpose(1, 2).reshape(1, Tp * Fp, -1)
            rule.to_official = lambda x: x.reshape(1, Tp, Fp, x.shape[-1]).transpose(1, 2).reshape(1, Tp * Fp, -1)
        elif family == "cavmae" and key == "decoder.pred_a.weight":  # rows (df, dt) <-> (dt, df): self-inverse
            rule.to_fastav = rule.to_official = lambda w: w.reshape(p, p, -1).transpose(0, 1).reshape(p * p, -1)
        elif family == "cavmae" and key == "decoder.pred_a.bias":
            rule.to_fastav = rule.to_official = lambda b: b.reshape(p, p).t().reshape(-1)
        rules.append(rule)
    return rules


def _apply(fn: Transform | None, x: Tensor) -> Tensor:
    return x if fn is None else fn(x)


def import_official(
    model: nn.Module,
    official: Mapping[str, Tensor],
    family: Family,
    *,
    source: str,
    strict: bool,
    prefix: str = "",
) -> tuple[LoadReport, dict[str, Tensor]]:
    """Convert ``official`` (prefix already stripped) to fastav keys, check shapes, return (report, tensors).

    Nothing is written to the model here: callers load the tensors once every check has passed.
    """
    model_sd = model.state_dict()
    report = LoadReport(source, family)
    converted: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in key_map(model, family):
        if rule.official not in official:
            report.missing.append(rule.fastav)
            continue
        used.add(rule.official)
        theirs = official[rule.official]
        want = _apply(rule.to_official, torch.empty(model_sd[rule.fastav].shape, device="meta")).shape
        if theirs.shape != want:
            raise CheckpointError(
                f"{source}: key {prefix + rule.official!r} has shape {tuple(theirs.shape)}, but fastav's "
                f"{rule.fastav!r} needs {tuple(want)} in the {family} layout (check the model and data config: "
                f"widths, depths, frame_size, target_length, num_mel_bins, num_frames)"
            )
        converted[rule.fastav] = _apply(rule.to_fastav, theirs)
        report.loaded.append(rule.fastav)
    report.unexpected = [prefix + k for k in official if k not in used and k not in HARMLESS_EXTRAS]
    if not converted:
        example = next(iter(official), "<empty>")
        raise CheckpointError(
            f"{source}: foreign checkpoint: none of its {len(official)} keys (e.g. {prefix + example!r}) is a "
            f"{family} key such as {prefix + official_name(next(iter(model_sd)), family)!r}"
        )
    if strict and (report.missing or report.unexpected):
        hint = ""
        if any(".norm1_a." in k or ".norm2_v." in k for k in report.missing + report.unexpected):
            hint = " (LayerNorm sets differ: CAV-MAE checkpoints need model.tagged_norms=all, STELLA's 'shared')"
        raise CheckpointError(
            f"{source}: strict load failed{hint}; missing {report.missing[:8]} ({len(report.missing)}), "
            f"unexpected {report.unexpected[:8]} ({len(report.unexpected)}); pass strict=False to load the rest"
        )
    return report, converted


def _load_into(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            if key in tensors:
                param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))


def _strip(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """Keys under the first prefix of ``prefixes`` that any key carries (stripped), the rest, and that prefix."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            return inside, {k: v for k, v in sd.items() if not k.startswith(prefix)}, prefix
    return dict(sd), {}, ""


# ---------------------------------------------------------------------------------------------------------------------
# CAV-MAE
# ---------------------------------------------------------------------------------------------------------------------


def load_cavmae(model: nn.Module, source: Source, *, strict: bool = True) -> LoadReport:
    """Load an official CAV-MAE checkpoint (``CAVMAE`` into an AVMAE, ``CAVMAEFT`` or ``CAVMAE`` into an
    AVClassifier) into ``model``, permuting the audio layout to the canonical time-major order.

    Loading a pre-training checkpoint into a classifier needs ``strict=False`` (the decoder keys are unexpected
    and the head missing), as with the official code.
    """
    raw, name = read_state_dict(source)
    official, rest, prefix = _strip(raw, ("module.",))
    report, tensors = import_official(model, official, "cavmae", source=name, strict=strict, prefix=prefix)
    report.unexpected += list(rest)
    _load_into(model, tensors)
    return report


def export_cavmae(model: nn.Module) -> dict[str, Tensor]:
    """The official CAV-MAE state dict of ``model`` (``module.`` keys, frequency-major audio)."""
    return _export(model, "cavmae", "module.")


def _export(model: nn.Module, family: Family, prefix: str) -> dict[str, Tensor]:
    sd = model.state_dict()
    return {prefix + r.official: _apply(r.to_official, sd[r.fastav].detach().cpu()) for r in key_map(model, family)}


# ---------------------------------------------------------------------------------------------------------------------
# STELLA
# ---------------------------------------------------------------------------------------------------------------------

STELLA_BACKBONE_PREFIXES = (
    "module.backbone.transformer.",
    "backbone.transformer.",
    "module.transformer.",
    "transformer.",
)
STELLA_AVM_PREFIXES = ("module.avmatching_module.", "avmatching_module.")


def load_stella(model: nn.Module, source: Source, *, avm: nn.Module | None = None, strict: bool = True) -> LoadReport:
    """Load a STELLA checkpoint: the backbone into ``model`` and, when given, the AVM into ``avm``."""
    raw, name = read_state_dict(source)
    avm_sd, rest, avm_prefix = _strip(raw, STELLA_AVM_PREFIXES)
    if not avm_prefix:
        avm_sd, rest = {}, dict(raw)
    backbone, rest, prefix = _strip(rest, STELLA_BACKBONE_PREFIXES)
    report, tensors = import_official(model, backbone, "stella", source=name, strict=strict, prefix=prefix)
    report.unexpected += list(rest)
    avm_tensors: dict[str, Tensor] = {}
    if avm is not None:
        avm_tensors = _check_plain(avm, avm_sd, source=name, prefix=avm_prefix or STELLA_AVM_PREFIXES[0], strict=strict)
        report.loaded += [f"avm.{k}" for k in avm_tensors]
        report.missing += [f"avm.{k}" for k in avm.state_dict() if k not in avm_tensors]
    else:
        report.unexpected += [avm_prefix + k for k in avm_sd]
    _load_into(model, tensors)
    if avm is not None:
        _load_into(avm, avm_tensors)
    return report


def load_avm(avm: nn.Module, source: Source, *, strict: bool = True) -> LoadReport:
    """STELLA's AVM alone: from a fastav file (the ``avm.safetensors`` a run writes) or from the
    ``avmatching_module.*`` keys of an official STELLA / FLAVA checkpoint (the backbone keys there are ignored)."""
    if not isinstance(source, Mapping) and Path(source).suffix == ".safetensors":
        return load_weights(avm, source, strict=strict)
    raw, name = read_state_dict(source)
    avm_sd, _, prefix = _strip(raw, STELLA_AVM_PREFIXES)
    if not prefix:
        prefixes = " or ".join(STELLA_AVM_PREFIXES)
        raise CheckpointError(f"{name}: no AVM in this checkpoint (no key starts with {prefixes})")
    tensors = _check_plain(avm, avm_sd, source=name, prefix=prefix, strict=strict)
    _load_into(avm, tensors)
    report = LoadReport(name, "stella-avm", loaded=list(tensors))
    report.missing = [k for k in avm.state_dict() if k not in tensors]
    report.unexpected = [prefix + k for k in avm_sd if k not in tensors]
    return report


def export_stella(model: nn.Module, avm: nn.Module | None = None) -> dict[str, Tensor]:
    """A STELLA-layout state dict (``module.backbone.transformer.`` / ``module.avmatching_module.`` keys)."""
    out = _export(model, "stella", STELLA_BACKBONE_PREFIXES[0])
    if avm is not None:
        out.update({STELLA_AVM_PREFIXES[0] + k: v.detach().cpu() for k, v in avm.state_dict().items()})
    return out


def _check_plain(
    module: nn.Module, sd: Mapping[str, Tensor], *, source: str, prefix: str, strict: bool
) -> dict[str, Tensor]:
    """Same-name keys with shape checks (the AVM and fastav's own files have no layout transforms)."""
    mine = module.state_dict()
    out = {}
    for key, value in sd.items():
        if key in mine and value.shape != mine[key].shape:
            raise CheckpointError(
                f"{source}: key {prefix + key!r} has shape {tuple(value.shape)}, "
                f"the model needs {tuple(mine[key].shape)}"
            )
        if key in mine:
            out[key] = value
    missing = [k for k in mine if k not in out]
    unexpected = [prefix + k for k in sd if k not in mine]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{source}: strict load failed; missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} "
            f"({len(unexpected)})"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet MAE initialisation
# ---------------------------------------------------------------------------------------------------------------------

_BLOCK_NORMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")


def adapt_imagenet_mae(model: nn.Module, source: Source, family: Family) -> LoadReport:
    """Initialise ``model`` from an ImageNet MAE ViT checkpoint with decoder (``mae_pretrain_vit_base_full.pth``)
    the way CAV-MAE's ``adapt_vmae_weights.py`` / STELLA's ``adapt_imae_weights_to_vamae.py`` do:

    - MAE blocks ``0 .. s-1`` go to both ``blocks_a`` and ``blocks_v``; blocks ``s ..`` to ``blocks_u`` with their
      LayerNorms copied into the audio and video sets; ``norm`` into ``norm``, ``norm_a`` and ``norm_v``;
    - the video patch embedding as is, the audio one summed over the RGB input channels (official orientation
      of ``family``: CAV-MAE's kernel spans (F, T), STELLA's (T, F));
    - video position tables from MAE's without the CLS row, repeated over frames; audio tables stay sin-cos;
    - decoder by name; the video head is MAE's ``decoder_pred``, the audio head its first p*p output rows;
      the mask token goes to the shared one (CAV-MAE) or both (STELLA).

    Modality embeddings, audio positions and ``inter_pos_embed`` keep their fresh initialisation (``missing``).
    """
    mae, name = read_state_dict(source)
    grid = _grid_of(model)
    encoder = model.encoder
    n_mae = 1 + max((int(k.split(".")[1]) for k in mae if k.startswith("blocks.")), default=-1)
    specific, shared = len(encoder.blocks_a), len(encoder.blocks_u)
    if "patch_embed.proj.weight" not in mae:
        raise CheckpointError(f"{name}: foreign checkpoint: no 'patch_embed.proj.weight' (expected an MAE ViT)")
    if n_mae != specific + shared:
        raise CheckpointError(
            f"{name}: MAE checkpoint has {n_mae} blocks ('blocks.{n_mae - 1}.*'); the model needs "
            f"model.specific_depth + model.shared_depth = {specific} + {shared}"
        )
    out: dict[str, Tensor] = {}
    for key, value in mae.items():
        if not key.startswith("blocks."):
            continue
        _, idx, sub = key.split(".", 2)
        i = int(idx)
        if i < specific:
            out[f"blocks_a.{i}.{sub}"] = out[f"blocks_v.{i}.{sub}"] = value
        else:
            out[f"blocks_u.{i - specific}.{sub}"] = value
            if sub in _BLOCK_NORMS:
                norm, param = sub.split(".")
                out[f"blocks_u.{i - specific}.{norm}_a.{param}"] = value
                out[f"blocks_u.{i - specific}.{norm}_v.{param}"] = value
    for target in ("norm", "norm_a", "norm_v"):
        for param in ("weight", "bias"):
            _copy(mae, f"norm.{param}", out, f"{target}.{param}")
    weight_v = mae["patch_embed.proj.weight"]
    out["patch_embed_v.proj.weight"] = weight_v
    out["patch_embed_a.proj.weight"] = weight_v.sum(dim=1, keepdim=True)
    for target in ("patch_embed_v.proj.bias", "patch_embed_a.proj.bias"):
        _copy(mae, "patch_embed.proj.bias", out, target)
    if "pos_embed" in mae:
        out["pos_embed_v"] = mae["pos_embed"][:, 1:].repeat(1, grid.frames, 1)
    if "decoder_pos_embed" in mae:
        out["decoder_pos_embed_v"] = mae["decoder_pos_embed"][:, 1:].repeat(1, grid.frames, 1)
    for key, value in mae.items():
        if key.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.")):
            out[key] = value
    if "mask_token" in mae:
        for target in ("mask_token",) if family == "cavmae" else ("mask_token_a", "mask_token_v"):
            out[target] = mae["mask_token"]
    if family == "cavmae":
        head_a, head_v = "decoder_pred_a.", "decoder_pred_v."
    else:
        head_a, head_v = "mae_score_audio.decoder.", "mae_score_video.decoder."
    for param in ("weight", "bias"):
        if f"decoder_pred.{param}" in mae:
            full = mae[f"decoder_pred.{param}"]
            out[head_v + param] = full
            out[head_a + param] = full[: grid.audio_patch_dim]  # official audio row order of the family
    report, tensors = import_official(model, out, family, source=name, strict=False)
    report.unexpected = [k for k in mae if not _used_mae_key(k)]
    _load_into(model, tensors)
    return report


def _copy(src: Mapping[str, Tensor], key: str, dst: dict[str, Tensor], target: str) -> None:
    if key in src:
        dst[target] = src[key]


def _used_mae_key(key: str) -> bool:
    used = ("blocks.", "norm.", "patch_embed.", "decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
    return key.startswith(used) or key in ("pos_embed", "decoder_pos_embed", "mask_token")


# ---------------------------------------------------------------------------------------------------------------------
# fastav safetensors
# ---------------------------------------------------------------------------------------------------------------------


def save_weights(
    module: nn.Module, path: str | os.PathLike, *, config: Config | None = None, extra: Mapping[str, str] | None = None
) -> Path:
    """Write ``module``'s state dict as a safetensors file (atomically), with the resolved config in its metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **(extra or {})}
    if config is not None:
        metadata["config"] = config.to_json()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(module: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> LoadReport:
    """Load a file written by :func:`save_weights`; official checkpoints go through :func:`load_cavmae` /
    :func:`load_stella` instead."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        meta = read_weights_metadata(path)
    except Exception as err:  # safetensors raises its own error types for non-safetensors bytes
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a fastav weights file (metadata format={meta.get('format')!r}); official CAV-MAE / STELLA "
            f"checkpoints load with load_cavmae / load_stella"
        )
    sd, name = read_state_dict(path)
    tensors = _check_plain(module, sd, source=name, prefix="", strict=strict)
    _load_into(module, tensors)
    report = LoadReport(name, "fastav", loaded=list(tensors))
    report.missing = [k for k in module.state_dict() if k not in tensors]
    report.unexpected = [k for k in sd if k not in tensors]
    return report


def config_from_weights(path: str | os.PathLike) -> Config | None:
    """The config stored in a fastav weights file, if any."""
    raw = read_weights_metadata(path).get("config")
    return Config.from_dict(json.loads(raw)) if raw else None


def load_init(model: nn.Module, path: str | os.PathLike, *, family: Family) -> LoadReport:
    """``model.init``: a fastav weights file (``.safetensors``, strict) or an official CAV-MAE / STELLA checkpoint
    in ``family``'s layout (missing and unexpected keys reported, not fatal: a pre-training checkpoint has no
    classifier, a fine-tuned one no decoder)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"model.init: {path}: no such file; give the weights.safetensors of a fastav run or an official "
            f"CAV-MAE / STELLA checkpoint (.pth), or leave model.init empty for a random start"
        )
    if path.suffix == ".safetensors":
        return load_weights(model, path)
    return (load_cavmae if family == "cavmae" else load_stella)(model, path, strict=False)
