"""Data: the DALI pipeline over fastav shards, CAV-MAE's Kaldi fbank on the device, and the reference loader.

``build_loader(cfg, split, rank=..., world_size=...)`` yields the batch contract of design.md as device tensors.
DALI and torchaudio are imported only by the modules that need them.
"""

from fastav.data.fbank import kaldi_fbank, normalize_fbank
from fastav.data.loader import AVLoader, DataError, build_loader

__all__ = ["AVLoader", "DataError", "build_loader", "kaldi_fbank", "normalize_fbank"]
