"""fastav: high-throughput audio-video representation learning (CAV-MAE, STELLA, MLA).

Importing ``fastav`` has no side effects: no environment variables are set, nothing is downloaded and
no heavy framework (DALI, DeepSpeed) is imported until the submodule that needs it is.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
