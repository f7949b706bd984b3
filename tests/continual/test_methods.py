"""The continual methods' steps on a debug-size model, without DeepSpeed: what each feeds the model, what it adds to
the loss, what it stores, and that a whole step (forward, backward, memory insert) reads nothing on the host."""

from __future__ import annotations

import pytest
import torch

from fastav.config import load_config
from fastav.continual import ER, LUMP, METHODS, DERpp, Finetune, build_method
from fastav.data import SyntheticAV
from fastav.train.engine import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")


def _setup(name: str, *overrides: str):
    cfg = load_config(
        "debug",
        [f"method.name={name}", "method.memory_size=16", "data.batch_size=4", "data.source=synthetic",
         "data.synthetic_clips=24", *overrides],
    )  # fmt: skip
    method = build_method(cfg, CPU)
    batches = list(SyntheticAV(cfg, "train"))
    return cfg, method, batches


def test_registry_and_config_agree() -> None:
    from fastav.config import CONTINUAL_METHODS as NAMES

    assert set(METHODS) == set(NAMES)
    for name in NAMES:
        _, method, _ = _setup(name)
        assert method.name == name


def test_finetune_is_the_plain_objective() -> None:
    _, method, batches = _setup("finetune")
    assert isinstance(method, Finetune)
    torch.manual_seed(1)
    out = method(batches[0])
    torch.manual_seed(1)
    ref = method.model(batches[0]["fbank"], batches[0]["video"])
    assert torch.equal(out.loss, ref.loss) and set(out.terms) >= {"loss", "loss_mae_a", "loss_mae_v", "loss_nce"}


def test_er_replays_after_the_first_step_and_stores_what_it_trained_on(monkeypatch) -> None:
    _, method, batches = _setup("er")
    assert isinstance(method, ER)
    rows = []
    forward = method.model.forward
    monkeypatch.setattr(
        method.model, "forward", lambda fbank, video, **kw: rows.append(fbank.shape[0]) or forward(fbank, video, **kw)
    )
    for batch in batches[:3]:
        out = method(batch)
        method.after_step(batch, out)
    assert rows == [4, 8, 8]  # nothing to replay at first, then B current + B replayed
    assert method.memory.filled == 12 and method.memory.seen == 12
    stored = method.memory.store["fbank"][:4].float()
    assert torch.allclose(stored, batches[0]["fbank"], atol=3e-2)  # the first batch, as trained on (bf16)


def test_derpp_penalty_is_alpha_times_the_mse_of_stored_and_current_pooled_embeddings() -> None:
    cfg, method, batches = _setup("derpp", "method.derpp.alpha=0.3")
    assert isinstance(method, DERpp)
    first = method(batches[0])
    assert float(first.terms["loss_der"]) == 0.0 and set(first.extras) == {"pooled_a", "pooled_v"}
    method.after_step(batches[0], first)
    assert torch.equal(method.memory.store["pooled_a"][:4], first.extras["pooled_a"])
    seed = torch.random.get_rng_state()
    gen_state = method.memory.generator.get_state()
    second = method(batches[1])
    # recompute the penalty by hand from the same draw and the same masks
    torch.random.set_rng_state(seed)
    method.memory.generator.set_state(gen_state)
    draw = method.memory.draw(4)
    out = method.model(torch.cat([batches[1]["fbank"], draw["fbank"]]), torch.cat([batches[1]["video"], draw["video"]]))
    mse = ((out.pooled_a_BD[4:] - draw["pooled_a"]) ** 2).mean() + (
        (out.pooled_v_BD[4:] - draw["pooled_v"]) ** 2
    ).mean()
    assert torch.allclose(second.terms["loss_der"], 0.3 * mse, rtol=1e-5)
    assert torch.allclose(second.loss, out.loss + 0.3 * mse, rtol=1e-5) and float(second.terms["loss_der"]) > 0


def test_lump_trains_on_a_mix_of_the_batch_and_a_replay_draw(monkeypatch) -> None:
    _, method, batches = _setup("lump", "method.lump.mix_alpha=0.5")
    assert isinstance(method, LUMP)
    seen = []
    forward = method.model.forward
    monkeypatch.setattr(
        method.model, "forward", lambda fbank, video, **kw: seen.append(fbank.clone()) or forward(fbank, video, **kw)
    )
    method.after_step(batches[0], method(batches[0]))
    out = method(batches[1])
    lam = float(out.terms["lump_lambda"])
    assert 0.0 < lam < 1.0 and seen[1].shape[0] == 4  # the mixed batch only: no concatenation
    # every mixed row is lam * current + (1 - lam) * one of the stored clips
    stored = method.memory.store["fbank"][:4].float()
    rest = (seen[1] - lam * batches[1]["fbank"]) / (1 - lam)
    for row in rest:
        assert min(float((row - s).abs().max()) for s in stored) < 2e-2
    stored_first = method.memory.store["fbank"][:4].float()
    assert torch.allclose(stored_first, batches[0]["fbank"], atol=3e-2)  # the unmixed clips go into the memory


@pytest.mark.parametrize("name", ["er", "derpp", "lump"])
def test_a_whole_step_reads_nothing_on_the_host(name: str, host_reads) -> None:
    _, method, batches = _setup(name)
    method.after_step(batches[0], method(batches[0]))  # the memory holds a batch: the next step replays
    with host_reads() as rec:
        for batch in batches[1:3]:
            out = method(batch)
            out.loss.backward()
            method.after_step(batch, out)
            method.gauges()
    assert not rec.calls, dict(rec.calls)


def test_memory_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than one batch .*raise method.memory_size"):
        _setup("er", "method.memory_size=3")
