"""The deployment's worker pools: configured (``LORAFORGE_TRAIN_POOLS``) or detected here.

Detection never imports torch (the API process calls it): GPUs come from ``nvidia-smi``, RAM from
``os.sysconf``. It is what the embedded ``loraforge serve`` wants, where the API, the worker and
the GPUs share one machine; a scale-out deployment lists its pools explicitly, the same list for
the API and every worker.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache

from loraforge.settings import Settings, TrainPool

GPU_POOL = "gpu"
CPU_POOL = "cpu"
NVIDIA_SMI = ("nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits")


def _visible(memories: list[float]) -> list[float]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves visible (nvidia-smi itself ignores it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return memories
    items = [v.strip() for v in visible.split(",") if v.strip()]
    if not items or items[0] == "-1":
        return []
    if all(i.isdigit() for i in items):
        return [memories[int(i)] for i in items if int(i) < len(memories)]
    # UUIDs or MIG names: the count is known, not which ones; size them all as the smallest.
    return [min(memories)] * min(len(items), len(memories)) if memories else []


def gpu_memories_gib() -> list[float]:
    """Memory of each visible NVIDIA GPU (GiB), from ``nvidia-smi``; [] when there is none."""
    try:
        out = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    memories = []
    for line in out.splitlines():
        try:
            memories.append(round(float(line.strip()) / 1024, 1))  # MiB
        except ValueError:
            continue  # "[N/A]" or a warning line
    return _visible(memories)


def ram_gib() -> float:
    """This machine's physical memory (GiB)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        return 8.0  # an unknown platform: assume a small machine


@lru_cache(maxsize=1)
def detect_pools() -> tuple[TrainPool, ...]:
    """This machine's pools: ``gpu`` (all visible GPUs, sized as the smallest) if any, and ``cpu``.

    Cached per process: nvidia-smi takes a moment and the hardware does not change under us.
    """
    pools = []
    gpus = gpu_memories_gib()
    if gpus:
        pools.append(TrainPool(name=GPU_POOL, device="cuda", count=len(gpus), memory_gib=min(gpus)))
    pools.append(TrainPool(name=CPU_POOL, device="cpu", count=1, memory_gib=ram_gib()))
    return tuple(pools)


def resolve_pools(settings: Settings) -> list[TrainPool]:
    """The configured pools, or the detected ones when ``train_pools`` is "auto" (unset)."""
    if settings.train_pools is not None:
        return list(settings.train_pools)
    return list(detect_pools())
