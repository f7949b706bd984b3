"""Retrieval gathered over 2 processes (gloo on the CPU, no DeepSpeed) equals retrieval in one process over the whole
set: each rank reads half of the batches, one of them ends with a padded batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launching import free_port
from torch import Tensor, nn

from fastav.eval import embed, evaluate_retrieval

CLIPS, BATCH, DIM, KS, NAMES = 13, 4, 6, (1, 3, 5), ("t0", "t1", "t2")


class Tiny(nn.Module):
    """Fixed projections of the flattened inputs, L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.audio = nn.Parameter(torch.randn(2 * DIM, DIM, generator=g))
        self.video = nn.Parameter(torch.randn(3 * DIM, DIM, generator=g))

    def embed_clips(self, fbank: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        a = fbank.flatten(1) @ self.audio
        v = video.flatten(1) @ self.video
        return nn.functional.normalize(a, dim=-1), nn.functional.normalize(v, dim=-1)


def dataset_batches() -> list[dict[str, Tensor]]:
    """13 clips in 4 batches of 4; the last holds clip 12 and 3 padding copies of clip 0 (valid False). Audio and
    video share a latent, so the ranks spread from hits to misses."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(CLIPS, DIM, generator=g)
    fbank = torch.cat([z, z], dim=1) + 0.8 * torch.randn(CLIPS, 2 * DIM, generator=g)
    video = torch.cat([z, -z, z], dim=1) + 0.8 * torch.randn(CLIPS, 3 * DIM, generator=g)
    batches = []
    for start in range(0, CLIPS, BATCH):
        rows = list(range(start, min(start + BATCH, CLIPS)))
        pad = BATCH - len(rows)
        idx = torch.tensor(rows + [0] * pad)
        batches.append({
            "fbank": fbank[idx].view(BATCH, 2, DIM),
            "video": video[idx].view(BATCH, 3, DIM),
            "task": idx % 3,
            "index": idx,
            "valid": torch.tensor([True] * len(rows) + [False] * pad),
        })  # fmt: skip
    return batches


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        batches = dataset_batches()
        half = len(batches) // world
        mine = batches[rank * half : (rank + 1) * half]
        module = Tiny()
        device = torch.device("cpu")
        result = evaluate_retrieval(module, mine, device=device, ks=KS, group_names=NAMES)
        emb = embed(module, mine, device=device)
        torch.save({"result": result, "index": emb.index, "audio": emb.audio, "video": emb.video},
                   Path(out_dir) / f"rank{rank}.pt")  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    batches = dataset_batches()
    assert batches[-1]["valid"].tolist() == [True, False, False, False]
    module = Tiny()
    single = evaluate_retrieval(module, batches, device=torch.device("cpu"), ks=KS, group_names=NAMES)
    whole = embed(module, batches, device=torch.device("cpu"))
    assert single["gallery"] == CLIPS
    ranks_seen = {single["a2v"]["overall"]["r1"], single["a2v"]["overall"]["r5"]}
    assert len(ranks_seen) == 2 and 0 < single["a2v"]["overall"]["r5"] < 100  # not a degenerate case

    # fork: the children inherit the imported torch (a fresh interpreter spends seconds importing it); safe here, the
    # parent holds no process group, no CUDA context and runs one intra-op thread
    torch.multiprocessing.start_processes(
        _worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["result"] == single, f"rank {rank}"
        assert got["index"].tolist() == list(range(CLIPS))  # rank order, padding dropped
        torch.testing.assert_close(got["audio"], whole.audio, rtol=0, atol=0)
        torch.testing.assert_close(got["video"], whole.video, rtol=0, atol=0)
