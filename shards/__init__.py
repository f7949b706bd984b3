"""Building, synthesising and reading fastav's WebDataset shards (``python -m shards --help``).

This package needs only numpy and PyAV: shard building runs on machines without torch, DALI or a GPU.
"""

from shards.manifest import FORMAT_VERSION, ManifestError, load_manifest, shard_paths
from shards.writer import Sample, ShardError, ShardInfo, read_index, write_shard

__all__ = [
    "FORMAT_VERSION",
    "ManifestError",
    "Sample",
    "ShardError",
    "ShardInfo",
    "load_manifest",
    "read_index",
    "shard_paths",
    "write_shard",
]
