"""Helpers for tests that start training processes: the environment of a CPU launch and a free local port."""

from __future__ import annotations

import os
import socket

# set by a launcher in the parent process; a child must get its own from the launcher it is started with
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cpu_launch_env() -> dict[str, str]:
    """This process's environment for a child training run on the CPU: one thread per process, DeepSpeed's CPU
    accelerator, no CUDA device, no progress bars, and no launcher variables inherited."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", FASTAV_NO_PROGRESS="1")
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    return env


def free_port() -> int:
    """A TCP port free on the loopback address now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
