"""STELLA's training step as the official code computes it, on fastav's modules: the baseline of bench/throughput.py.

Written from the official code (G-JWLee/STELLA_code at e90d5b7: ``models/cl_methods/stella.py``,
``models/cav.py``, ``models/objectives.py``, ``models/avm_module.py``, ``utils/buffer.py``, ``utils/amp.py``, and
the throughput loop of its predecessor G-JWLee/FLAVA_code, ``train_algo/throughput.py``) in plain PyTorch. The
model is fastav's (the same :class:`fastav.models.AVMAE` and :class:`fastav.models.AVMatching` weights, the same
configuration); what differs is how the step computes with them, which is what the bench compares:

1. ``requires_grad_(False)`` on the backbone (not ``no_grad``); the full clip through convolutional patch
   embeddings (the Linear weights viewed as Conv2d kernels) and the modality-specific layers; the codes, cloned,
   plus ``inter_pos_embed`` through the joint shared layers (the final norm computed too).
2. The AVM's q / k maps and the two logit maps S_av (B x H x A x V) and S_va (B x H x V x A) materialised;
   ``softmax(S / 0.4)`` and the means over heads and queries in the framework; candidate orders by ``argsort``.
3. L_AVM: labels permuted on the host, the negatives' videos deranged by redrawing a permutation until no
   negative keeps its own (checked pair by pair, each check a read of device values), the deranged codes copied
   with ``torch.stack``, the joint pass again, the AVM with its attention maps materialised, BCE.
4. Pooled queries by gathering queries and importance at the candidate ids (index tensors expanded with
   ``repeat``).
5. With a non-empty memory: the replay memory is ``Buffer_task_free``, fp32 tensors on the host: a draw is
   ``np.random.choice``, an index copy and a host-to-device copy of every field. pi by gathering S_av at the
   video candidates' columns (B x H x A x k_v, with an expanded int64 index) then at the audio candidates' rows,
   the importance-weighted mean over them, and the softmax of the stacked (past, current) pair, averaged over
   heads; pi scattered back to full length. Bernoulli pruning with boolean-mask assignment (current and stored
   rows); video: ``torch.multinomial`` over the current and replayed rows; audio: the chunk walk in a Python loop
   over rows and chunks, branching on device values, then ``argsort`` of the pruned mask.
6. The selected patches gathered from (R, L, C, 16, 16) patch tensors; the MAE as ``models/cav.py`` runs it:
   patch embedding per patch, positional rows gathered from a batch-repeated table, the selected tokens scattered
   back to full length with zeros, the visible tokens drawn inside the selection, explicit (materialised)
   attention in every block, the unimodal codes cloned, the three shared passes, the decoder's sequence built at
   full length and cut back to the selection with boolean masks (a data-dependent shape), prediction heads on
   the hidden tokens, the losses of ``models/objectives.py`` (symmetric InfoNCE by log-softmax diagonals).
7. The DER penalty; the memory insert one row and one field at a time, each ``.detach().cpu()`` (reservoir slots
   from NumPy).
8. Under ``torch.autocast`` fp16 on a GPU (fp32 on the CPU unless asked), the loss sum, ``GradScaler``
   scale / backward / unscale / step / update, ``torch.optim.Adam`` (torch's default implementation, decay on
   matrices only) and ``zero_grad``.

Deviations, each needed to run it today or on fastav's modules:

- torch 2.x refuses ``multinomial(w, 784, replacement=False)`` when fewer than 784 weights are positive, which
  the official code asks for after pruning (torch 1.9 put zero weights last); the k_v kept patches are drawn with
  ``multinomial(w, k_v)`` (the same distribution of the kept set) and the unchosen ones appended in index order.
- The AVM's output layout follows ``model.avm_layout`` ('standard' by default; 'official' is the official code's
  reshape); the cost is the same.
- InfoNCE negatives: one process has nothing to gather (the official code all-gathers after a barrier).
- No DistributedDataParallel wrapper (one process).
- ``deterministic=True`` (for tests): no pruning and the top-k of every row, current and replayed (the official
  first-step rule), so that the step can be compared with fastav's on the same selection. ``mask_noise`` and
  ``matching_pairs`` are the two random draws a test may replace.

Shape suffixes: N current clips, R current + replayed rows, A / V audio / video tokens, K selected, H heads, E head
width, D width, C decoder width.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastav.config import Config
from fastav.models import AVMAE, AVMatching
from fastav.models.layers import Block
from fastav.train.engine import parameter_groups


class HostBuffer:
    """``utils/buffer.py``'s ``Buffer_task_free``: a task-free reservoir of fp32 tensors on the host (STELLA stores
    audio_data, video_data, logits_a / _v, audio_query / video_query, prob_a_att / prob_v_att, n_attn_va /
    n_attn_av per clip), slots from NumPy, one row and one field at a time."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.store: dict[str, Tensor] = {}
        self.np_random = np.random.RandomState(seed % 2**32)

    def is_empty(self) -> bool:
        return self.seen == 0

    def _slot(self) -> int:
        if self.seen < self.capacity:
            return self.seen
        r = int(self.np_random.randint(0, self.seen + 1))
        return r if r < self.capacity else -1

    def add(self, **fields: Tensor) -> None:
        if not self.store:
            self.store = {k: torch.zeros(self.capacity, *v.shape[1:], dtype=torch.float32) for k, v in fields.items()}
        for i in range(next(iter(fields.values())).shape[0]):
            slot = self._slot()
            self.seen += 1
            if slot >= 0:
                for name, value in fields.items():
                    self.store[name][slot] = value[i].detach().cpu()

    def get(self, size: int) -> dict[str, Tensor]:
        filled = min(self.seen, self.capacity)
        choice = self.np_random.choice(filled, size=min(size, filled), replace=False)
        return {name: t[choice] for name, t in self.store.items()}


def _conv_weight(linear: nn.Linear, channels: int, patch: int) -> Tensor:
    """fastav's patch embedding (a Linear on (p, q, c)-flattened patches) viewed as the official Conv2d kernel."""
    return linear.weight.view(linear.out_features, patch, patch, channels).permute(0, 3, 1, 2)


class OfficialSTELLA(nn.Module):
    """The official STELLA step over fastav's ``model`` and ``avm`` (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        model: AVMAE,
        avm: AVMatching,
        *,
        capacity: int,
        precision: str = "fp32",
        seed: int = 2021,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        m, s = cfg.model, cfg.method.stella
        if m.decoder_joint or not m.inter_pos_embed or m.shared_mask_token:
            raise ValueError("the official STELLA step needs STELLA's backbone (model.arch=stella's layout)")
        self.cfg = cfg
        self.model = model
        self.avm = avm
        self.grid = model.grid
        self.k_v = int(self.grid.video_tokens * (1 - s.core_video_ratio))
        self.k_a = int(self.grid.audio_tokens * (1 - s.core_audio_ratio))
        self.buffer = HostBuffer(capacity, seed)
        self.coin = random.Random(seed)
        self.deterministic = deterministic
        self.precision = precision
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._trainable = [(p, p.requires_grad) for p in self.model.parameters()]

    # --- the training step (utils/amp.py, FLAVA's train_algo/throughput.py) -----------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def build_optimizer(self) -> None:
        """``torch.optim.Adam`` over the decay / no-decay groups, and the grad scaler (enabled for fp16 only)."""
        t = self.cfg.train
        groups = parameter_groups(self, t.weight_decay)
        self.optimizer = torch.optim.Adam(groups, lr=t.lr, betas=(t.betas[0], t.betas[1]))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def train_step(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Forward under autocast, the loss sum, scaled backward, unscale, step, update, zero_grad."""
        if self.optimizer is None or self.scaler is None:
            self.build_optimizer()
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            terms = self(batch)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return {k: v.detach() for k, v in terms.items()}

    # --- building blocks as models/cav.py computes them --------------------------------------------------------

    @staticmethod
    def block(blk: Block, x: Tensor, modality: str = "joint") -> Tensor:
        """A ViT block with the official explicit attention: (q * scale) @ k^T, softmax, @ v."""
        norm1, norm2 = blk.norms(modality)
        attn = blk.attn
        B, L, D = x.shape
        y = norm1(x)
        qkv = attn.qkv(y).reshape(B, L, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = ((q * (D // attn.num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + attn.proj((weights @ v).transpose(1, 2).reshape(B, L, D))
        return x + blk.mlp(norm2(x))

    def codes(self, audio: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """inter_c_a / inter_c_v: the full clip through the conv patch embeddings and the specific layers."""
        enc, p = self.model.encoder, self.grid.patch
        x_a = F.conv2d(audio, _conv_weight(enc.embed_a.proj, 1, p), enc.embed_a.proj.bias, stride=p)
        x_a = x_a.flatten(2).transpose(1, 2)
        x_a += enc.embed_a.modality  # in place, as the official code (the sum keeps the conv's dtype)
        x_a += enc.embed_a.pos
        B, T, C, H, W = video.shape
        x_v = F.conv2d(video.reshape(B * T, C, H, W), _conv_weight(enc.embed_v.proj, C, p), enc.embed_v.proj.bias,
                       stride=p)  # fmt: skip
        x_v = x_v.flatten(2).transpose(1, 2).reshape(B, -1, x_v.shape[1])
        x_v += enc.embed_v.modality
        x_v += enc.embed_v.pos.repeat(B, 1, 1)[:, : x_v.shape[1]]
        for blk in enc.blocks_a:
            x_a = self.block(blk, x_a)
        for blk in enc.blocks_v:
            x_v = self.block(blk, x_v)
        return x_a.clone(), x_v.clone()

    def joint_from_codes(self, z_a: Tensor, z_v: Tensor) -> tuple[Tensor, Tensor]:
        """The codes (cloned) + inter_pos_embed through the joint shared layers: (embedding_a, embedding_v)."""
        enc = self.model.encoder
        B = z_a.shape[0]
        x_a, x_v = z_a.clone(), z_v.clone()
        x_a += enc.inter_pos_a.weight.repeat(B, 1, 1)
        x_v += enc.inter_pos_v.weight.repeat(B, 1, 1)
        x = torch.cat([x_a, x_v], dim=1)
        for blk in enc.blocks_u:
            x = self.block(blk, x)
        e_a, e_v = x[:, : x_a.shape[1]], x[:, -x_v.shape[1] :]
        enc.norm(x)  # computed and unused, as in the official forward
        return e_a, e_v

    def _heads(self, x: Tensor, linear: nn.Linear) -> Tensor:
        B, L, _ = x.shape
        return linear(x).reshape(B, L, self.avm.num_heads, -1).permute(0, 2, 1, 3)

    def infer_attention(self, e_a: Tensor, e_v: Tensor) -> tuple[Tensor, ...]:
        """``CrossModalAttention.infer_attention(normalize=False)``: S_av, S_va, v_q, v_k, a_q, a_k."""
        x_v, x_a = self.avm.norm_v(e_v), self.avm.norm_a(e_a)
        a_q, v_k = self._heads(x_a, self.avm.to_a_q), self._heads(x_v, self.avm.to_v_k)
        scale = a_q.shape[-1] ** -0.5
        s_av = (a_q @ v_k.transpose(-2, -1)) * scale
        v_q, a_k = self._heads(x_v, self.avm.to_v_q), self._heads(x_a, self.avm.to_a_k)
        s_va = (v_q @ a_k.transpose(-2, -1)) * scale
        return s_av, s_va, v_q, v_k, a_q, a_k

    def avm_logits(self, e_a: Tensor, e_v: Tensor) -> Tensor:
        """``CrossModalAttention.forward``: both attentions materialised, pooled, matching head."""
        avm = self.avm
        x_v, x_a = avm.norm_v(e_v), avm.norm_a(e_a)
        v_q, v_k, v_v = (self._heads(x_v, lin) for lin in (avm.to_v_q, avm.to_v_k, avm.to_v_v))
        a_q, a_k, a_v = (self._heads(x_a, lin) for lin in (avm.to_a_q, avm.to_a_k, avm.to_a_v))
        scale = a_q.shape[-1] ** -0.5
        att_av = ((a_q @ v_k.transpose(-2, -1)) * scale).softmax(dim=-1)
        att_va = ((v_q @ a_k.transpose(-2, -1)) * scale).softmax(dim=-1)
        o_a, o_v = att_av @ v_v, att_va @ a_v
        B = o_a.shape[0]

        def rows(o: Tensor) -> Tensor:  # 'official': the reshape without moving the head axis
            return (o if avm.layout == "official" else o.transpose(1, 2)).reshape(B, o.shape[2], -1)

        u = torch.cat([rows(o_v).mean(dim=1), rows(o_a).mean(dim=1)], dim=1)
        return avm.matching_score(u)

    def matching_pairs(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Labels and the video index of each audio, drawn as ``learn_multimodal_relationship`` does."""
        if n <= 2:
            return torch.ones(n, device=device), torch.arange(n, device=device)
        pos = n // 2
        labels = torch.cat([torch.ones(pos), torch.zeros(n - pos)]).to(device)
        labels = labels[torch.randperm(n)]
        zero = (labels == 0).nonzero().view(-1)
        video_ids = torch.arange(n, device=device)
        shuffled = zero.clone()
        while True:
            shuffled = shuffled[torch.randperm(shuffled.shape[0])]
            if not any(bool(a == b) for a, b in zip(zero, shuffled, strict=True)):
                break
        video_ids[zero] = shuffled
        return labels, video_ids

    def learn(self, z_v: Tensor, z_a: Tensor) -> Tensor:
        """L_AVM on the current clips (before its weight)."""
        labels, video_ids = self.matching_pairs(z_a.shape[0], z_a.device)
        deranged = torch.stack(list(z_v[video_ids]))
        e_a, e_v = self.joint_from_codes(z_a, deranged)
        logits = self.avm_logits(e_a, e_v)
        return F.binary_cross_entropy_with_logits(logits.squeeze(), labels.squeeze())

    def core_audio_mask(self, importance: Tensor, pruned: Tensor, keep: int) -> Tensor:
        """``compute_core_audio_indices``: whole time chunks walked in a weighted random order until ``keep``
        unpruned patches, the boundary chunk cut from the side next to a chosen neighbour (a coin otherwise);
        (R, A) bool, True = dropped. A Python loop over rows and chunks that reads device values."""
        F_, T_ = self.grid.audio_f, self.cfg.method.stella.num_core_audio_times
        R = importance.shape[0]
        per_time = importance.reshape(R, -1, F_).sum(dim=-1)
        prune = pruned.reshape(R, -1, F_)
        pruned_per_time = prune.sum(dim=-1)
        chunk_score = F.avg_pool1d(per_time.unsqueeze(1), kernel_size=T_).squeeze(1)
        order = torch.multinomial(chunk_score, chunk_score.shape[1], replacement=False)
        chunks = per_time.shape[1] // T_
        for b in range(R):
            count = 0
            for t in range(chunks):
                c = order[b][t]
                count = count + (F_ * T_ - pruned_per_time[b, c * T_ : (c + 1) * T_].sum())
                if count > keep:
                    chunk = prune[b, c * T_ : (c + 1) * T_].reshape(-1)
                    before = order[b][:t]
                    left, right = (c - 1) in before, (c + 1) in before
                    from_end = (left and not right) or (left == right and self.coin.randint(0, 1) == 0)
                    kept = torch.flip(~chunk, dims=(0,)) if from_end else ~chunk
                    cut = torch.where(torch.cumsum(kept, dim=0) == (count - keep))[0][0]
                    if from_end:
                        chunk[-(cut + 1) :] = True
                    else:
                        chunk[: cut + 1] = True
                    prune[b, c * T_ : (c + 1) * T_] = chunk.reshape(T_, F_)
                    for t_later in range(t + 1, chunks):
                        later = order[b][t_later]
                        prune[b, later * T_ : (later + 1) * T_] = True
                    break
        return prune.reshape(R, -1)

    def video_order(self, weights: Tensor) -> Tensor:
        """Sampled video order: k_v patches by ``multinomial`` without replacement, the unchosen ones after."""
        kept = torch.multinomial(weights, self.k_v, replacement=False)
        chosen = torch.zeros_like(weights).scatter_(1, kept, 1.0)
        rest = torch.argsort(chosen, dim=1, stable=True)[:, : weights.shape[1] - self.k_v]
        return torch.cat([kept, rest], dim=1)

    def select_patches(self, ids_v: Tensor, ids_a: Tensor, video: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """``importance_based_patch_selection``: (R, k_v, 3, p, p) and (R, k_a, 1, p, p)."""
        p = self.grid.patch
        R, T, C, H, W = video.shape
        patches_v = video.transpose(1, 2).reshape(R, C, T, H // p, p, W // p, p).permute(0, 1, 2, 3, 5, 4, 6)
        patches_v = patches_v.reshape(R, C, -1, p, p).transpose(1, 2)
        core_v = torch.gather(patches_v, 1, ids_v[:, : self.k_v, None, None, None].repeat(1, 1, C, p, p))
        _, _, Ta, Fa = audio.shape
        patches_a = audio.reshape(R, 1, Ta // p, p, Fa // p, p).permute(0, 1, 2, 4, 3, 5)
        patches_a = patches_a.reshape(R, 1, -1, p, p).transpose(1, 2)
        core_a = torch.gather(patches_a, 1, ids_a[:, : self.k_a, None, None, None].repeat(1, 1, 1, p, p))
        return core_v, core_a

    def mask_noise(self, modality: str, ids_selected: Tensor) -> Tensor:
        """Noise ranking the selected tokens (visible = smallest): ``torch.rand`` as the official masking."""
        return torch.rand(ids_selected.shape, device=ids_selected.device)

    def guided_masking(self, modality: str, ids_full: Tensor, x: Tensor, mask_ratio: float, comp_ratio: float):
        """``modality_guided_masking(reconstruct_compressed=True)``: scatter to full length, mask inside it."""
        N, K, D = x.shape
        L = int(K / (1 - comp_ratio))
        if L != ids_full.shape[1]:
            raise ValueError(f"the official masking rebuilds {L} tokens from {K}, not the grid's {ids_full.shape[1]}")
        x = torch.cat([x, torch.zeros(N, int(L * comp_ratio), D, device=x.device)], dim=1)  # fp32 zeros
        x = torch.gather(x, 1, torch.argsort(ids_full, dim=1)[:, :, None].repeat(1, 1, D))
        n_comp, n_in = int(L * (1 - comp_ratio)), int(L * (1 - mask_ratio))
        ids_sorted = ids_full.clone()
        shuffle = torch.argsort(self.mask_noise(modality, ids_full[:, :n_comp]), dim=1)
        ids_sorted[:, :n_comp] = torch.gather(ids_sorted[:, :n_comp], 1, shuffle)
        ids_restore = torch.argsort(ids_sorted, dim=1)
        ids_keep = ids_sorted[:, :n_in]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        input_mask = torch.ones(N, L, device=x.device)
        input_mask[:, :n_in] = 0
        target_mask = torch.ones(N, L, device=x.device)
        target_mask[:, n_in:n_comp] = 0
        input_mask = torch.gather(input_mask, 1, ids_restore)
        target_mask = torch.gather(target_mask, 1, ids_restore)
        return x_masked, input_mask.bool(), target_mask.bool(), ids_restore, ids_keep

    def decode(self, modality: str, dx: Tensor, ids_full: Tensor, input_mask: Tensor, target_mask: Tensor,
               ids_restore: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """The decoder on one modality: full-length sequence, cut back to the selection with boolean masks."""
        dec = self.model.decoder
        token = dec.mask_token_a if modality == "a" else dec.mask_token_v
        pos, kind = (dec.pos_embed_a, dec.modality_a) if modality == "a" else (dec.pos_embed_v, dec.modality_v)
        N, n, C = dx.shape
        dx = torch.cat([dx, token.repeat(N, ids_restore.shape[1] - n, 1)], dim=1)
        dx = torch.gather(dx, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
        dx += pos
        input_mask = torch.gather(input_mask, 1, ids_full)
        target_mask = torch.gather(target_mask, 1, ids_full)
        valid = torch.logical_or(~input_mask, ~target_mask)
        valid_input = input_mask[valid].reshape(N, -1)
        valid_target = target_mask[valid].reshape(N, -1)
        dx = torch.gather(dx, 1, ids_full[:, :, None].repeat(1, 1, C))
        dx = dx[valid].reshape(N, -1, C)
        dx += kind
        for blk in dec.blocks:
            dx = self.block(blk, dx)
        return dec.norm(dx), valid_input, valid_target

    @staticmethod
    def _mae_loss(pred: Tensor, target: Tensor, valid_target: Tensor, norm_pix: bool) -> Tensor:
        N, _, P = target.shape
        target = target[~valid_target].reshape(N, -1, P)
        if norm_pix:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred - target) ** 2).mean(dim=-1)

    def mae(self, core_v: Tensor, core_a: Tensor, ids_v: Tensor, ids_a: Tensor) -> dict[str, Tensor]:
        """``CAV.forward`` on the selected patches + ``compute_mae_joint_frames`` with the contrastive loss."""
        enc, dec, m, p = self.model.encoder, self.model.decoder, self.cfg.model, self.grid.patch
        s = self.cfg.method.stella
        R, K_a, _, _, _ = core_a.shape
        D = m.embed_dim
        x_a = F.conv2d(core_a.reshape(R * K_a, 1, p, p), _conv_weight(enc.embed_a.proj, 1, p), enc.embed_a.proj.bias)
        x_a = x_a.reshape(R, K_a, D)
        x_a += enc.embed_a.modality
        x_a += torch.gather(enc.embed_a.pos.repeat(R, 1, 1), 1, ids_a[:, :K_a].unsqueeze(-1).repeat(1, 1, D))
        x_a, in_a, tg_a, restore_a, keep_a = self.guided_masking("a", ids_a, x_a, m.mask_ratio_a, s.core_audio_ratio)
        for blk in enc.blocks_a:
            x_a = self.block(blk, x_a)
        K_v, C = core_v.shape[1], core_v.shape[2]
        x_v = F.conv2d(core_v.reshape(R * K_v, C, p, p), _conv_weight(enc.embed_v.proj, C, p), enc.embed_v.proj.bias)
        x_v = x_v.reshape(R, K_v, D)
        x_v += enc.embed_v.modality
        x_v += torch.gather(enc.embed_v.pos.repeat(R, 1, 1), 1, ids_v[:, :K_v].unsqueeze(-1).repeat(1, 1, D))
        x_v, in_v, tg_v, restore_v, keep_v = self.guided_masking("v", ids_v, x_v, m.mask_ratio_v, s.core_video_ratio)
        for blk in enc.blocks_v:
            x_v = self.block(blk, x_v)
        inter_c_a, inter_c_v = x_a.clone(), x_v.clone()  # the official forward returns the unimodal codes too
        x_a += torch.gather(enc.inter_pos_a.weight.repeat(R, 1, 1), 1, keep_a.unsqueeze(-1).repeat(1, 1, D))
        x_v += torch.gather(enc.inter_pos_v.weight.repeat(R, 1, 1), 1, keep_v.unsqueeze(-1).repeat(1, 1, D))
        c_a, c_v = x_a, x_v
        for blk in enc.blocks_u:
            c_a = self.block(blk, c_a, "a")
        for blk in enc.blocks_u:
            c_v = self.block(blk, c_v, "v")
        c_a, c_v = enc.norm_a(c_a), enc.norm_v(c_v)
        x = torch.cat([x_a, x_v], dim=1)
        for blk in enc.blocks_u:
            x = self.block(blk, x)
        dx = dec.embed(enc.norm(x))
        y_a, v_in_a, v_tg_a = self.decode("a", dx[:, : x_a.shape[1]], ids_a, in_a, tg_a, restore_a)
        y_v, v_in_v, v_tg_v = self.decode("v", dx[:, -x_v.shape[1] :], ids_v, in_v, tg_v, restore_v)
        Ca = y_a.shape[-1]
        pred_a = dec.pred_a(y_a[v_in_a].reshape(R, -1, Ca))
        pred_v = dec.pred_v(y_v[v_in_v].reshape(R, -1, Ca))
        target_a = core_a.reshape(R, K_a, p * p)
        target_v = core_v.permute(0, 1, 3, 4, 2).reshape(R, K_v, p * p * C)
        loss_a = self._mae_loss(pred_a, target_a, v_tg_a, m.norm_pix_loss).sum() / v_in_a.sum()
        loss_v = self._mae_loss(pred_v, target_v, v_tg_v, m.norm_pix_loss).sum() / v_in_v.sum()
        audio_output, video_output = c_a.mean(dim=1), c_v.mean(dim=1)
        a_rep, v_rep = F.normalize(audio_output, dim=-1), F.normalize(video_output, dim=-1)
        va = torch.mm(v_rep, a_rep.transpose(0, 1)) / m.contrastive_tau
        nce = -torch.mean(torch.diag(F.log_softmax(va, dim=-1)))
        if m.bidirectional_contrastive:
            av = torch.mm(a_rep, v_rep.transpose(0, 1)) / m.contrastive_tau
            nce = (nce - torch.mean(torch.diag(F.log_softmax(av, dim=-1)))) / 2
        return {
            "mae_audio_loss": loss_a * m.mae_weight,
            "mae_frame_loss": loss_v * m.mae_weight,
            "contrastive_loss": nce * m.contrastive_weight,
            "nce": nce,
            "audio_output": audio_output,
            "video_output": video_output,
            "inter_c_a": inter_c_a,
            "inter_c_v": inter_c_v,
        }

    # --- the step (models/cl_methods/stella.py, STELLA.forward in training) ------------------------------------

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every term of the step and their sum ``loss`` (fastav's term names); inserts into the memory."""
        s = self.cfg.method.stella
        video, audio = batch["video"], batch["fbank"].unsqueeze(1)  # video_data, audio_data (B x 1 x T x F)
        N, device = video.shape[0], video.device
        self.model.requires_grad_(False)
        z_a, z_v = self.codes(audio, video)
        L_A, L_V = z_a.shape[1], z_v.shape[1]
        self.avm.requires_grad_(False)
        e_a, e_v = self.joint_from_codes(z_a, z_v)
        s_av, s_va, v_q, v_k, a_q, a_k = self.infer_attention(e_a, e_v)
        imp_v = (s_av / s.att_temperature).softmax(dim=-1).mean(dim=1).mean(dim=1)
        ids_v = torch.argsort(imp_v, dim=1, descending=True)
        imp_a = (s_va / s.att_temperature).softmax(dim=-1).mean(dim=1).mean(dim=1)
        ids_a = torch.argsort(imp_a, dim=1, descending=True)
        self.avm.requires_grad_(True)
        bce = self.learn(z_v, z_a)
        for param, trainable in self._trainable:  # the official code sets requires_grad back on the backbone
            param.requires_grad_(trainable)
        _, H, _, E = v_k.shape
        kv, ka, scale = self.k_v, self.k_a, E**-0.5
        cand_v, cand_a = ids_v[:, :kv], ids_a[:, :ka]
        keys_v = torch.gather(v_k, 2, cand_v[:, None, :, None].repeat(1, H, 1, E))
        w_v = torch.gather(imp_v, 1, cand_v)
        q_v = torch.gather(v_q, 2, cand_v[:, None, :, None].repeat(1, H, 1, E))
        q_v = torch.sum(q_v * w_v[:, None, :, None], dim=2) / torch.sum(w_v, dim=1, keepdim=True).unsqueeze(1)
        keys_a = torch.gather(a_k, 2, cand_a[:, None, :, None].repeat(1, H, 1, E))
        w_a = torch.gather(imp_a, 1, cand_a)
        q_a = torch.gather(a_q, 2, cand_a[:, None, :, None].repeat(1, H, 1, E))
        q_a = torch.sum(q_a * w_a[:, None, :, None], dim=2) / torch.sum(w_a, dim=1, keepdim=True).unsqueeze(1)

        buf = None
        if not self.buffer.is_empty():
            buf = {k: v.to(device, non_blocking=True) for k, v in self.buffer.get(N).items()}
            past = torch.einsum("nhld,nhd->nhl", keys_v, buf["audio_query"][:N]) * scale
            cur = torch.gather(s_av, -1, cand_v[:, None, None, :].repeat(1, H, L_A, 1))
            cur = torch.gather(cur, 2, cand_a[:, None, :, None].repeat(1, H, 1, kv))
            cur = torch.sum(cur * w_a[:, None, :, None], dim=2) / torch.sum(w_a, dim=1, keepdim=True).unsqueeze(1)
            prob_v = torch.stack([past, cur], dim=3).softmax(dim=-1).mean(dim=1)[:, :, 0]
            prob_v = torch.cat([prob_v, torch.zeros(N, L_V - kv, device=device)], dim=1)
            prob_v = torch.gather(prob_v, 1, torch.argsort(ids_v, dim=1))
            past = torch.einsum("nhld,nhd->nhl", keys_a, buf["video_query"][:N]) * scale
            cur = torch.gather(s_va, -1, cand_a[:, None, None, :].repeat(1, H, L_V, 1))
            cur = torch.gather(cur, 2, cand_v[:, None, :, None].repeat(1, H, 1, ka))
            cur = torch.sum(cur * w_v[:, None, :, None], dim=2) / torch.sum(w_v, dim=1, keepdim=True).unsqueeze(1)
            prob_a = torch.stack([past, cur], dim=3).softmax(dim=-1).mean(dim=1)[:, :, 0]
            prob_a = torch.cat([prob_a, torch.zeros(N, L_A - ka, device=device)], dim=1)
            prob_a = torch.gather(prob_a, 1, torch.argsort(ids_a, dim=1))
            if self.deterministic:
                ids_v = torch.argsort(torch.cat([imp_v, buf["n_attn_av"]]), dim=1, descending=True)
                ids_a = torch.argsort(torch.cat([imp_a, buf["n_attn_va"]]), dim=1, descending=True)
            else:
                pruned_imp_v = imp_v.clone()
                pruned_imp_v[torch.bernoulli(prob_v).bool()] = 0.0
                prune_a = torch.bernoulli(prob_a).bool()
                buf["n_attn_av"][torch.bernoulli(buf["prob_v_att"]).bool()] = 0.0
                ids_v = self.video_order(torch.cat([pruned_imp_v, buf["n_attn_av"]], dim=0))
                buf_prune_a = torch.bernoulli(buf["prob_a_att"]).bool()
                mask_a = self.core_audio_mask(
                    torch.cat([imp_a, buf["n_attn_va"]]), torch.cat([prune_a, buf_prune_a]), ka
                )
                ids_a = torch.argsort(mask_a.float(), dim=1)
            video_all = torch.cat([video, buf["video_data"]], dim=0)
            audio_all = torch.cat([audio, buf["audio_data"]], dim=0)
        else:
            prob_v, prob_a = torch.zeros(N, L_V), torch.zeros(N, L_A)
            video_all, audio_all = video, audio

        core_v, core_a = self.select_patches(ids_v, ids_a, video_all, audio_all)
        out = self.mae(core_v, core_a, ids_v, ids_a)
        if buf is not None:
            penalty = s.alpha * F.mse_loss(buf["logits_a"], out["audio_output"][-N:]) + s.alpha * F.mse_loss(
                buf["logits_v"], out["video_output"][-N:]
            )
        else:
            penalty = torch.zeros(1, device=device)
        self.buffer.add(
            video_data=video, audio_data=audio, logits_a=out["audio_output"][:N], logits_v=out["video_output"][:N],
            audio_query=q_a, video_query=q_v, prob_v_att=prob_v, prob_a_att=prob_a, n_attn_av=imp_v, n_attn_va=imp_a,
        )  # fmt: skip
        vam_loss = bce * s.matching_loss_weight
        loss = out["mae_audio_loss"] + out["mae_frame_loss"] + out["contrastive_loss"] + vam_loss + penalty
        return {
            "loss": loss.reshape(()),
            "loss_mae_a": out["mae_audio_loss"],
            "loss_mae_v": out["mae_frame_loss"],
            "loss_nce": out["nce"],
            "loss_avm": bce,
            "loss_der": penalty.reshape(()),
        }
