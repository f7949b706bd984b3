"""Building, synthesising and reading fastav's WebDataset shards (``python -m shards --help``).

The bottom layer of the project: ``fastav.data`` reads what this package writes, and this package imports
nothing from ``fastav``, nor torch or DALI. It needs numpy and PyAV (FFmpeg's libraries), and draws progress
bars with tqdm when tqdm is installed; shard building runs on machines without torch, DALI or a GPU. The
``builder_version`` it records in manifests is the version of the installed ``fastav`` distribution, read from
its metadata (:func:`shards.manifest.builder_version`).
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
