"""STELLA and STELLA+: continual audio-video pre-training with AVM-guided patch selection (docs/methods/stella.md).

One training step, per rank, in the order of the official ``models/cl_methods/stella.py`` (B current clips; R = B
replayed clips once the memory holds any, none on the very first step):

1. **Relations** (:meth:`STELLA.relations`, no gradient: backbone and AVM frozen). The full clips through the
   modality-specific layers (``z_a``, ``z_v``), then through the joint shared layers (``e_a``, ``e_v``), the
   AVM's LayerNorm + q / k maps; importance ``I_v`` (audio queries over video keys) and ``I_a`` (video queries
   over audio keys) at temperature ``method.stella.att_temperature``, averaged over heads and queries
   (``kernels.attention_importance``); the candidate sets ``C_v`` / ``C_a``, the top ``1 - core_*_ratio`` of
   each (``kernels.topk_mask``); the pooled queries ``q_a`` (audio queries weighted by ``I_a`` over ``C_a``) and
   ``q_v`` (``kernels.pooled_query``). Then **L_AVM** on the current clips only (:meth:`STELLA.avm_loss`): half
   the pairs deranged, the pairs through the joint shared layers without a gradient, the AVM with one, so L_AVM
   trains the AVM alone.
2. **Selection** (:meth:`STELLA.correlation`, :meth:`STELLA.select`). With a replay draw, current row b is paired
   with draw row b: ``pi_v`` = mean over heads of sigmoid(<q_a(draw b) - q_a(b), k_v(b)> * scale) on ``C_v``,
   ``pi_a`` symmetric (``kernels.replay_correlation``). Replay rows bring their stored ``I`` and ``pi`` and get a
   fresh Bernoulli draw from them every step (the kernels' rng advances once per step). Video: the weights of
   pruned patches zeroed, then k_v patches drawn without replacement in proportion to the rest
   (``kernels.select_video``); audio: the chunk scores from the *unpruned* ``I_a``, the pruned mask passed
   beside them, whole time chunks walked in a weighted random order (``kernels.select_audio``). While the memory
   is empty: deterministic top-k. The chosen patches come straight from the clips (``kernels.gather_*_patches``).
3. **Loss**: MAE with ``model.mask_ratio_*`` of the full length visible inside the selection, the decoder over
   the selected tokens only, plus InfoNCE, on current and replayed clips (``AVMAE.forward_patches``); plus
   ``matching_loss_weight`` x L_AVM; plus ``alpha`` x (MSE of the replayed clips' stored mean-pooled audio and
   video embeddings against this step's). The total is the plain sum.
4. **Memory insert** (:meth:`STELLA.after_step`): the current clips with their unpruned ``I``, ``pi`` (zeros when
   the memory was empty), pooled queries and embeddings, on the device.

STELLA+ (:class:`STELLAPlus`) stores only the selected patches of the current clips (uint8 video patches, bf16
audio patches), their grid positions, the embeddings and the queries; a replayed clip is trained on exactly the
stored patches, without re-selection (``models/cl_methods/stella_p.py`` of the official initial commit).

Nothing in the step reads a device value on the host: every size is static (k_v, k_a, the draw count min(B,
filled) is known on the host), randomness comes from device generators and the kernels' device ``rng``.

Shape suffixes: B current clips, R current + replayed rows, A / V audio / video patches, K selected patches, H
heads, E head width, D embedding width, P patch vector length.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from fastav.config import Config, ConfigError
from fastav.continual.memory import IMAGENET_MEAN, IMAGENET_STD, Field, clip_fields
from fastav.continual.methods import ReplayMethod
from fastav.log import get_logger
from fastav.models import AVMAE, build_avm, matching_loss
from fastav.models.weights import load_avm
from fastav.train.method import StepOutput

log = get_logger("fastav.continual")

VIDEO_STREAM, AUDIO_STREAM = 0, 1
"""Call-site ids of the two selections in the kernels' Philox counters."""


@dataclass
class Relations:
    """Stage 1 of a step for the current clips (all without gradient)."""

    z_a_BAD: Tensor
    """Full audio through the modality-specific layers (STELLA's ``inter_c_a``); the AVM loss reads it."""
    z_v_BVD: Tensor
    imp_a_BA: Tensor
    """Audio importance I_a (video queries over audio keys), fp32, rows sum to 1."""
    imp_v_BV: Tensor
    """Video importance I_v (audio queries over video keys)."""
    cand_a_BA: Tensor
    """Candidate set C_a: the top k_a of I_a (bool)."""
    cand_v_BV: Tensor
    q_a_BHE: Tensor
    """Pooled audio query: the AVM's audio queries weighted by I_a over C_a (fp32)."""
    q_v_BHE: Tensor
    k_a_BHAE: Tensor
    """The AVM's audio keys."""
    k_v_BHVE: Tensor
    scale: float
    """The AVM's logit scale (head width ** -0.5)."""


@dataclass
class Selection:
    """Stage 2: the patches every row trains on and the current rows' pruning probabilities."""

    ids_a_RK: Tensor
    """Selected audio grid positions, ascending, (R, k_a) int64."""
    ids_v_RK: Tensor
    pi_a_BA: Tensor
    """pi_a of the current rows against their replay partners (zeros without a draw), fp32."""
    pi_v_BV: Tensor
    patches_a_RKP: Tensor
    """The selected audio patch vectors (current rows gathered from the clips, then the replayed rows)."""
    patches_v_RKP: Tensor


class STELLA(ReplayMethod):
    """STELLA: the replay memory holds the raw clips with their importance, pi, pooled queries and embeddings."""

    name: ClassVar[str] = "stella"
    memory_layout: ClassVar[str] = "uint8 frames, bf16 fbank, fp32 I, pi, pooled queries and embeddings"

    def __init__(self, cfg: Config, model: AVMAE, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(cfg, model, rank=rank, world_size=world_size)
        s, grid = cfg.method.stella, model.grid
        if not cfg.model.avm:
            raise ConfigError(f"model.avm: got false; accepted: true for method.name='{self.name}' (it needs the AVM)")
        self.k_v = int(grid.video_tokens * (1 - s.core_video_ratio))
        self.k_a = int(grid.audio_tokens * (1 - s.core_audio_ratio))
        if grid.audio_t % s.num_core_audio_times or self.k_a <= 0 or self.k_v <= 0:
            raise ConfigError(
                f"method.stella: {grid.audio_t} audio time steps, num_core_audio_times={s.num_core_audio_times}, "
                f"{self.k_a} audio / {self.k_v} video patches kept: the time steps must split into whole chunks of "
                f"num_core_audio_times and each selection must keep at least one patch"
            )
        for modality, k, total, ratio in (
            ("a", self.k_a, grid.audio_tokens, cfg.model.mask_ratio_a),
            ("v", self.k_v, grid.video_tokens, cfg.model.mask_ratio_v),
        ):
            if int(total * (1 - ratio)) > k:
                raise ConfigError(
                    f"model.mask_ratio_{modality}: {ratio} keeps {int(total * (1 - ratio))} of {total} tokens visible, "
                    f"more than the {k} that method.stella.core_{'audio' if modality == 'a' else 'video'}_ratio selects"
                )
        self.avm = build_avm(cfg)
        if s.avm_init:
            log.info("method.stella.avm_init %s: %s", s.avm_init, load_avm(self.avm, s.avm_init))
        elif rank == 0:
            log.warning(
                "method.stella.avm_init is empty: the AVM starts random (as STELLA's released commands); train it "
                "first with launch/avm.py and pass method.stella.avm_init=RUN/avm.safetensors"
            )
        self.rng_seed = (cfg.train.seed * 1_000_003 + 104_729 * rank + 29) % 2**62
        self._rng: Tensor | None = None

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def rng(self) -> Tensor:
        """The kernels' sampling state ``[seed, offset]`` on the training device, advanced once per step."""
        if self._rng is None:
            self._rng = kernels.new_rng(self.rng_seed, next(self.model.parameters()).device)
        return self._rng

    def extra_weights(self) -> dict[str, torch.nn.Module]:
        return {"avm": self.avm}

    def rank_state(self) -> dict[str, Any]:
        return {**super().rank_state(), "kernel_rng": self.rng.cpu()}  # sync-ok: checkpoint

    def load_rank_state(self, state: Mapping[str, Any]) -> None:
        super().load_rank_state(state)
        if "kernel_rng" in state:
            self.rng.copy_(state["kernel_rng"].to(self.rng.device))

    def memory_fields(self) -> dict[str, Field]:
        d, grid = self.cfg.data, self.model.grid
        fields = clip_fields(d.num_frames, d.frame_size, d.target_length, d.num_mel_bins)
        fields.update(self._shared_fields())
        for what in ("imp", "pi"):  # importance I and pruning probabilities pi, as computed when inserted
            fields[f"{what}_v"] = Field((grid.video_tokens,), torch.float32)
            fields[f"{what}_a"] = Field((grid.audio_tokens,), torch.float32)
        return fields

    def _shared_fields(self) -> dict[str, Field]:
        """Embeddings (DER targets) and pooled queries: stored by both variants."""
        m = self.cfg.model
        heads, width = m.num_heads, m.embed_dim // m.num_heads
        return {
            "pooled_a": Field((m.embed_dim,), torch.float32),
            "pooled_v": Field((m.embed_dim,), torch.float32),
            "q_a": Field((heads, width), torch.float32),
            "q_v": Field((heads, width), torch.float32),
        }

    # --- stage 1 -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def relations(self, fbank_BTF: Tensor, video_BTCHW: Tensor) -> Relations:
        """Codes, importance, candidate sets and pooled queries of the current clips (backbone and AVM frozen)."""
        enc = self.model.encoder
        z_a, z_v = enc.specific_codes(fbank_BTF, video_BTCHW)
        e_a, e_v = enc.joint_codes(z_a, z_v)
        proj = self.avm.project(e_a, e_v)
        imp_a, imp_v = self.importance(proj.q_a, proj.k_a, proj.q_v, proj.k_v, proj.scale)
        cand_a, cand_v = kernels.topk_mask(imp_a, self.k_a), kernels.topk_mask(imp_v, self.k_v)
        q_a = kernels.pooled_query(proj.q_a, imp_a, cand_a)
        q_v = kernels.pooled_query(proj.q_v, imp_v, cand_v)
        return Relations(z_a, z_v, imp_a, imp_v, cand_a, cand_v, q_a, q_v, proj.k_a, proj.k_v, proj.scale)

    def importance(self, q_a: Tensor, k_a: Tensor, q_v: Tensor, k_v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """(I_a, I_v): the key softmax at ``att_temperature`` averaged over heads and queries; I_v from the audio
        queries over the video keys, I_a from the video queries over the audio keys."""
        tau = self.cfg.method.stella.att_temperature
        return (
            kernels.attention_importance(q_v, k_a, scale, tau),
            kernels.attention_importance(q_a, k_v, scale, tau),
        )

    def avm_loss(self, rel: Relations) -> tuple[Tensor, Tensor]:
        """L_AVM on the current clips and the matching accuracy: the (partly deranged) pairs go through the joint
        shared layers without a gradient (the backbone is frozen for it), so only the AVM learns from it."""
        joint = torch.no_grad()(self.model.encoder.joint_codes)
        loss, logits_B, labels_B = matching_loss(self.avm, joint, rel.z_a_BAD, rel.z_v_BVD)
        acc = ((logits_B.detach() > 0).float() == labels_B).float().mean()
        return loss, acc

    # --- stage 2 -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def correlation(self, rel: Relations, draw: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(pi_a, pi_v) of the current rows, row b against replay row b (one-to-one)."""
        pi_a = kernels.replay_correlation(draw["q_v"], rel.q_v_BHE, rel.k_a_BHAE, rel.scale, rel.cand_a_BA)
        pi_v = kernels.replay_correlation(draw["q_a"], rel.q_a_BHE, rel.k_v_BHVE, rel.scale, rel.cand_v_BV)
        return pi_a, pi_v

    def _select_ids(
        self, imp_a: Tensor, imp_v: Tensor, pi_a: Tensor | None, pi_v: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Selected (audio, video) grid positions, ascending; top-k when pi is None (empty memory)."""
        first = pi_a is None
        ids_v = kernels.select_video(imp_v, pi_v, self.k_v, self.rng, deterministic=first, stream=VIDEO_STREAM)
        ids_a = kernels.select_audio(
            imp_a, pi_a, self.k_a, self.rng, chunk_times=self.cfg.method.stella.num_core_audio_times,
            freq_patches=self.model.grid.audio_f, deterministic=first, stream=AUDIO_STREAM,
        )  # fmt: skip
        return ids_a, ids_v

    @torch.no_grad()
    def select(
        self, rel: Relations, fbank_BTF: Tensor, video_BTCHW: Tensor, draw: Mapping[str, Tensor] | None
    ) -> Selection:
        """Stage 2 of STELLA: current and replayed rows selected together, then gathered from the clips."""
        if draw is None:
            ids_a, ids_v = self._select_ids(rel.imp_a_BA, rel.imp_v_BV, None, None)
            pi_a, pi_v = torch.zeros_like(rel.imp_a_BA), torch.zeros_like(rel.imp_v_BV)
        else:
            pi_a, pi_v = self.correlation(rel, draw)
            ids_a, ids_v = self._select_ids(
                torch.cat([rel.imp_a_BA, draw["imp_a"]]), torch.cat([rel.imp_v_BV, draw["imp_v"]]),
                torch.cat([pi_a, draw["pi_a"]]), torch.cat([pi_v, draw["pi_v"]]),
            )  # fmt: skip
            fbank_BTF = torch.cat([fbank_BTF, draw["fbank"]])
            video_BTCHW = torch.cat([video_BTCHW, draw["video"]])
        p = self.model.grid.patch
        patches_a = kernels.gather_audio_patches(fbank_BTF, ids_a, p)
        patches_v = kernels.gather_video_patches(video_BTCHW, ids_v, p)
        return Selection(ids_a, ids_v, pi_a, pi_v, patches_a, patches_v)

    # --- the step ------------------------------------------------------------------------------------------------

    def replay(self, batch_size: int) -> dict[str, Tensor] | None:
        draw = super().replay(batch_size)
        if draw is not None and next(iter(draw.values())).shape[0] != batch_size:
            # cannot happen: the memory holds at least one batch (checked at start) once the first one is inserted
            raise RuntimeError(f"{self.name} pairs each current clip with one replayed clip; the draw is short")
        return draw

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        s = self.cfg.method.stella
        fbank, video = self.inputs(batch)
        B = fbank.shape[0]
        rel = self.relations(fbank, video)  # 1. frozen: codes, importance, candidates, pooled queries
        loss_avm, avm_acc = self.avm_loss(rel)  # 1. the AVM trained on the current batch only
        draw = self.replay(B)
        sel = self.select(rel, fbank, video, draw)  # 2. correlation, pruning, selection, gather
        kernels.advance_rng(self.rng)
        out = self.model.forward_patches(  # 3. MAE inside the selection + InfoNCE, current and replayed rows
            sel.patches_a_RKP, sel.patches_v_RKP, sel_a_BK=sel.ids_a_RK, sel_v_BK=sel.ids_v_RK
        )
        if draw is None:
            penalty = out.loss.new_zeros(())
        else:
            mse_a = F.mse_loss(out.pooled_a_BD[B:].float(), draw["pooled_a"].float())
            mse_v = F.mse_loss(out.pooled_v_BD[B:].float(), draw["pooled_v"].float())
            penalty = s.alpha * (mse_a + mse_v)
        loss = out.loss + s.matching_loss_weight * loss_avm + penalty
        terms = {**self.terms(out, loss_avm=loss_avm, avm_acc=avm_acc, loss_der=penalty), "loss": loss.detach()}
        return StepOutput(loss, terms, self.memory_items(rel, sel, out.pooled_a_BD[:B], out.pooled_v_BD[:B], B))

    def memory_items(self, rel: Relations, sel: Selection, pooled_a: Tensor, pooled_v: Tensor, B: int) -> dict:
        """What stage 4 stores for the current clips (besides the clips themselves)."""
        return {
            "pooled_a": pooled_a.detach().float(),
            "pooled_v": pooled_v.detach().float(),
            "q_a": rel.q_a_BHE,
            "q_v": rel.q_v_BHE,
            "imp_a": rel.imp_a_BA,
            "imp_v": rel.imp_v_BV,
            "pi_a": sel.pi_a_BA,
            "pi_v": sel.pi_v_BV,
        }

    def after_step(self, batch: Mapping[str, Tensor], out: StepOutput) -> None:
        """4. Reservoir insert of the current clips (as trained on) and their step outputs, on the device."""
        self.memory.insert({"video": batch["video"], "fbank": batch["fbank"], **out.extras})


class STELLAPlus(STELLA):
    """STELLA+: the memory holds only the selected patches of each clip (and their positions), replayed as stored."""

    name: ClassVar[str] = "stella_plus"
    memory_layout: ClassVar[str] = "uint8 selected video patches, bf16 selected audio patches, int16 positions"

    @property
    def ids_dtype(self) -> torch.dtype:
        """Storage type of the stored grid positions: int16 while the grids allow it (784 at base size)."""
        grid = self.model.grid
        small = max(grid.video_tokens, grid.audio_tokens) <= torch.iinfo(torch.int16).max
        return torch.int16 if small else torch.int32

    def memory_fields(self) -> dict[str, Field]:
        grid = self.model.grid
        return {
            "patches_v": Field((self.k_v, grid.video_patch_dim), torch.uint8),
            "patches_a": Field((self.k_a, grid.audio_patch_dim), torch.bfloat16, model_input=True),
            "ids_v": Field((self.k_v,), self.ids_dtype),
            "ids_a": Field((self.k_a,), self.ids_dtype),
            **self._shared_fields(),
        }

    def _patch_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """ImageNet mean and std per element of a (p, q, c)-flattened video patch (copied to the device once)."""
        cached = getattr(self, "_stats", None)
        if cached is None or cached[0].device != device:
            reps = self.model.grid.patch**2
            cached = (
                torch.tensor(IMAGENET_MEAN, device=device).repeat(reps),
                torch.tensor(IMAGENET_STD, device=device).repeat(reps),
            )
            self._stats = cached
        return cached

    def encode_video_patches(self, patches_BKP: Tensor) -> Tensor:
        """ImageNet-normalised video patch vectors -> uint8 pixels (exact for 8-bit frames, as the clip memory)."""
        mean, std = self._patch_stats(patches_BKP.device)
        return ((patches_BKP.float() * std + mean) * 255.0).round_().clamp_(0, 255).to(torch.uint8)

    def decode_video_patches(self, pixels_BKP: Tensor, dtype: torch.dtype) -> Tensor:
        mean, std = self._patch_stats(pixels_BKP.device)
        return ((pixels_BKP.float() / 255.0 - mean) / std).to(dtype)

    @torch.no_grad()
    def select(
        self, rel: Relations, fbank_BTF: Tensor, video_BTCHW: Tensor, draw: Mapping[str, Tensor] | None
    ) -> Selection:
        """Stage 2 of STELLA+: only the current rows are selected (against their replay partners' queries); the
        replayed rows bring their stored patches and positions."""
        if draw is None:
            ids_a, ids_v = self._select_ids(rel.imp_a_BA, rel.imp_v_BV, None, None)
            pi_a, pi_v = torch.zeros_like(rel.imp_a_BA), torch.zeros_like(rel.imp_v_BV)
        else:
            pi_a, pi_v = self.correlation(rel, draw)
            ids_a, ids_v = self._select_ids(rel.imp_a_BA, rel.imp_v_BV, pi_a, pi_v)
        p = self.model.grid.patch
        patches_a = kernels.gather_audio_patches(fbank_BTF, ids_a, p)
        patches_v = kernels.gather_video_patches(video_BTCHW, ids_v, p)
        if draw is not None:
            patches_a = torch.cat([patches_a, draw["patches_a"]])
            patches_v = torch.cat([patches_v, self.decode_video_patches(draw["patches_v"], patches_v.dtype)])
            ids_a = torch.cat([ids_a, draw["ids_a"].long()])
            ids_v = torch.cat([ids_v, draw["ids_v"].long()])
        return Selection(ids_a, ids_v, pi_a, pi_v, patches_a, patches_v)

    def memory_items(self, rel: Relations, sel: Selection, pooled_a: Tensor, pooled_v: Tensor, B: int) -> dict:
        ids = self.ids_dtype
        return {
            "patches_v": self.encode_video_patches(sel.patches_v_RKP[:B]),
            "patches_a": sel.patches_a_RKP[:B],
            "ids_v": sel.ids_v_RK[:B].to(ids),
            "ids_a": sel.ids_a_RK[:B].to(ids),
            "pooled_a": pooled_a.detach().float(),
            "pooled_v": pooled_v.detach().float(),
            "q_a": rel.q_a_BHE,
            "q_v": rel.q_v_BHE,
        }

    def after_step(self, batch: Mapping[str, Tensor], out: StepOutput) -> None:
        """4. Reservoir insert of the current clips' selected patches, positions, embeddings and queries."""
        self.memory.insert(dict(out.extras))


STELLA_METHODS = (STELLA, STELLAPlus)
