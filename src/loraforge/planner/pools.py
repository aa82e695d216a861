"""The deployment's worker pools: configured (``LORAFORGE_TRAIN_POOLS``) or detected here.

Detection never imports torch (the API process calls it): GPUs come from ``nvidia-smi``
(``planner/gpus.py``), RAM from ``os.sysconf``. It is what the embedded ``loraforge serve`` wants,
where the API, the worker, the engine and the GPUs share one machine: ``serve`` detects once
(:func:`serve_layout`, which also leaves the engine its GPU) and hands the result to its children,
so the API plans onto exactly the pools the worker consumes. A scale-out deployment lists its
pools explicitly, the same list for the API and every worker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.planner.gpus import MIN_GPU_GIB, Gpu, detect_gpus, detect_gpus_at_start
from loraforge.planner.memory import CUDA_RESERVED_GIB, DTYPE_BYTES, GIB, total_params
from loraforge.settings import Settings, TrainPool

log = logging.getLogger(__name__)

GPU_POOL = "gpu"
CPU_POOL = "cpu"


def ram_gib() -> float:
    """This machine's physical memory (GiB)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        return 8.0  # an unknown platform: assume a small machine


def _gpu_pool(gpus: list[Gpu]) -> TrainPool | None:
    """The ``gpu`` pool of these GPUs, sized as the smallest; None without any."""
    if not gpus:
        return None
    return TrainPool(
        name=GPU_POOL,
        device="cuda",
        count=len(gpus),
        memory_gib=min(g.memory_gib for g in gpus),
        devices=tuple(g.id for g in gpus),
    )


def detect_pools(at_start: bool = False) -> tuple[TrainPool, ...]:
    """This machine's pools: ``gpu`` (all visible GPUs, sized as the smallest) if any, and ``cpu``.

    GPU detection is cached once it succeeds (``planner/gpus.py``); RAM is read each time (cheap).

    Args:
        at_start: for a process that fixes its pools once (``detect_gpus_at_start``: a failed
            detection is retried, then raised, never taken as "no GPU").

    Raises:
        GpuDetectionError: ``at_start`` and ``nvidia-smi`` kept failing.
    """
    gpu = _gpu_pool(list(detect_gpus_at_start() if at_start else detect_gpus()))
    cpu = TrainPool(name=CPU_POOL, device="cpu", count=1, memory_gib=ram_gib())
    return (gpu, cpu) if gpu is not None else (cpu,)


def resolve_pools(settings: Settings, at_start: bool = False) -> list[TrainPool]:
    """The configured pools, or the detected ones when ``train_pools`` is "auto" (unset).

    Args:
        settings: ``train_pools``.
        at_start: detect as :func:`detect_pools` does ``at_start`` (may raise
            ``GpuDetectionError``).
    """
    if settings.train_pools is not None:
        return list(settings.train_pools)
    return list(detect_pools(at_start))


def pool_device_ids(pool: TrainPool) -> tuple[str, ...]:
    """The ``CUDA_VISIBLE_DEVICES`` ids of a cuda pool's GPUs on this worker machine.

    ``pool.devices`` when given; else the first ``count`` entries of this process's
    ``CUDA_VISIBLE_DEVICES`` (ids a child must use too), else ``0 .. count-1``.
    """
    if pool.devices is not None:
        return pool.devices
    items = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if items and items[0] != "-1":
        return tuple(items[: pool.count])
    return tuple(str(i) for i in range(pool.count))


def engine_gib(entry: BaseModelEntry | None) -> float:
    """GPU memory the serving engine of ``entry`` takes: its base weights plus a CUDA context.

    The engine loads the base in the catalog dtype (``catalog/loading.py``); its KV cache is
    small next to that at the engine's batch sizes and is covered by the trainer's headroom.
    An entry without ``arch`` cannot be sized: only the context is counted.
    """
    if entry is None or entry.arch is None:
        return CUDA_RESERVED_GIB
    weights = total_params(entry.arch) * DTYPE_BYTES.get(entry.training.dtype, 4)
    return weights / GIB + CUDA_RESERVED_GIB


@dataclass(frozen=True)
class ServeLayout:
    """What ``loraforge serve`` runs with: its children's pools and the engine's extra env."""

    pools: list[TrainPool]
    engine_env: dict[str, str] = field(default_factory=dict)


def serve_layout(settings: Settings, engine_entry: BaseModelEntry | None) -> ServeLayout:
    """The pools of ``loraforge serve``, whose engine shares the machine's GPUs with training.

    Configured pools are taken as they are (the operator sized them). Detected ones leave room
    for the engine, which loads its base on a GPU when there is one: with several GPUs the engine
    is pinned to the first (``CUDA_VISIBLE_DEVICES`` in ``engine_env``) and the ``gpu`` pool is
    the others; with one, the engine's memory (:func:`engine_gib`) is taken off that GPU's size,
    and no gpu pool remains if too little is left.

    Args:
        settings: ``train_pools``.
        engine_entry: the catalog entry of the base model the engine serves (None: unknown).

    Returns:
        The pools and the engine's environment additions.

    Raises:
        GpuDetectionError: ``nvidia-smi`` is there but kept failing (``detect_gpus_at_start``):
            the children would otherwise run without the GPU pool for their whole life.
    """
    if settings.train_pools is not None:
        return ServeLayout(list(settings.train_pools))
    gpus = list(detect_gpus_at_start())
    cpu = TrainPool(name=CPU_POOL, device="cpu", count=1, memory_gib=ram_gib())
    if not gpus:
        return ServeLayout([cpu])
    if len(gpus) > 1:
        engine_gpu, training = gpus[0], gpus[1:]
        log.info("serve: the engine uses GPU %s; training leases the other %d", engine_gpu.id, len(training))
        # PCI bus order: the order nvidia-smi numbered the GPUs in, so the id means the same GPU.
        env = {"CUDA_VISIBLE_DEVICES": engine_gpu.id, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        gpu = _gpu_pool(training)
        return ServeLayout([gpu, cpu] if gpu else [cpu], env)
    only, reserved = gpus[0], engine_gib(engine_entry)
    left = round(only.memory_gib - reserved, 1)
    if left < MIN_GPU_GIB:
        log.warning(
            "serve: the engine needs ~%.1f GiB of the only GPU (%g GiB); no GPU pool for training",
            reserved,
            only.memory_gib,
        )
        return ServeLayout([cpu])
    log.info(
        "serve: the engine shares GPU %s; training plans with %g of its %g GiB",
        only.id,
        left,
        only.memory_gib,
    )
    return ServeLayout([TrainPool(name=GPU_POOL, device="cuda", memory_gib=left, devices=(only.id,)), cpu])
