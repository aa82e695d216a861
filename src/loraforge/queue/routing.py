"""Queue names: one Celery queue per training worker pool, ``train.<pool>``.

Pure (no Celery import): the API, the worker and the CLI agree on names through it.
"""

from __future__ import annotations

from collections.abc import Iterable

from loraforge.settings import TrainPool

DEFAULT_QUEUE = "default"
# Batches (``/v1/batches``) run from a queue of their own, in short stretches that each end by
# sending the next one: they never hold a worker thread long, so checks and training tasks wait
# at most one stretch for a thread.
BATCH_QUEUE = "batch"
TRAIN_QUEUE_PREFIX = "train"


def train_queue(pool: str) -> str:
    """The queue a job planned onto ``pool`` is trained from."""
    return f"{TRAIN_QUEUE_PREFIX}.{pool}"


def worker_queues(pools: Iterable[TrainPool], serve: Iterable[str] | None = None) -> list[str]:
    """The queues a worker consumes: ``default``, the training queue of each pool it serves, and
    ``batch``.

    Args:
        pools: the deployment's pools.
        serve: names of the pools this worker serves (None: all of them, as the embedded
            ``loraforge serve`` does).

    Returns:
        Queue names, ``default`` first and ``batch`` last.

    Raises:
        ValueError: ``serve`` names a pool that is not configured.
    """
    known = [pool.name for pool in pools]
    wanted = known if serve is None else list(dict.fromkeys(serve))
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown train pool(s) {unknown}; configured: {known}")
    return [DEFAULT_QUEUE, *(train_queue(name) for name in wanted), BATCH_QUEUE]
