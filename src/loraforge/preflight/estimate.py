"""What a job will do and roughly how long it takes, from the token counts, before it runs.

Hyperparameters resolve exactly as the trainer resolves them (``trainer/hyperparams.py``), so the
steps and trained tokens here are the ones the job then reports. The duration is
``startup + processed tokens / throughput``: throughput measured on this deployment's finished jobs
for the same base model when there are any, else a per-training-strategy default (rough: a
starting point, refined by every job that finishes). The strategy is the memory planner's for one
80 GB GPU (``planner.plan.nominal_strategy``): the pre-flight also runs offline, with no pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.contracts.hyperparams import auto_batch_size, auto_n_epochs, steps_per_epoch
from loraforge.planner.plan import nominal_strategy

# strategy -> (startup seconds: process, model load; tokens per second: forward + backward).
# cpu: tiny-llama on 2 cores (FACTS_CPU §3: ~0.02-0.1 s per 4 x 87-token step, ~8 s of imports).
# fsdp: 70B bf16 over 4 GPUs (PERF.md §3: ~786 tokens/s per H100 for FSDP+QLoRA 70B).
DEFAULT_THROUGHPUT: dict[str, tuple[float, float]] = {
    "cpu": (8.0, 4000.0),
    "lora": (120.0, 6000.0),
    "qlora": (420.0, 700.0),
    "fsdp": (600.0, 3000.0),
}
_FALLBACK = (120.0, 2000.0)
# A validation pass (forward only, once per epoch) costs about a third of a training pass.
VALIDATION_COST = 1 / 3


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    source: str  # "measured" (this deployment's finished jobs) or "default"


def default_throughput(entry: BaseModelEntry) -> Throughput:
    """The catalog strategy's default tokens per second."""
    return Throughput(DEFAULT_THROUGHPUT.get(nominal_strategy(entry), _FALLBACK)[1], "default")


def startup_seconds(entry: BaseModelEntry) -> float:
    """Seconds a run spends before its first step (process start, model load)."""
    return DEFAULT_THROUGHPUT.get(nominal_strategy(entry), _FALLBACK)[0]


def _requested(hyper: dict[str, Any], key: str) -> Any:
    value = hyper.get(key, "auto")
    return "auto" if value is None else value


def estimate_job(
    entry: BaseModelEntry,
    hyperparameters: dict[str, Any],
    n_examples: int,
    tokens: dict[str, Any] | None,
    validation_tokens: dict[str, Any] | None,
    throughput: Throughput,
) -> dict[str, Any]:
    """The resolved hyperparameters, steps, token totals and duration of a job.

    Args:
        entry: the base model.
        hyperparameters: the job's requested values (``"auto"`` allowed).
        n_examples: valid training examples.
        tokens: the training file's ``TokenStats.to_dict()`` (None: tokenizer unavailable).
        validation_tokens: the validation file's token stats, if any.
        throughput: tokens per second to assume.

    Returns:
        A JSON-able dict; ``estimated_trained_tokens`` is what the job reports as ``trained_tokens``.
    """
    n = max(n_examples, 1)
    n_epochs = _requested(hyperparameters, "n_epochs")
    n_epochs = auto_n_epochs(n) if n_epochs == "auto" else int(n_epochs)
    batch = _requested(hyperparameters, "batch_size")
    batch = auto_batch_size(n, entry.max_batch_size) if batch == "auto" else int(batch)
    lrm = _requested(hyperparameters, "learning_rate_multiplier")
    lrm = 1.0 if lrm == "auto" else float(lrm)
    per_epoch = steps_per_epoch(n, batch)
    out: dict[str, Any] = {
        "n_examples": n_examples,
        "n_epochs": n_epochs,
        "batch_size": batch,
        "learning_rate_multiplier": lrm,
        "steps_per_epoch": per_epoch,
        "total_steps": per_epoch * n_epochs,
        "tokens_per_epoch": None,
        "trained_tokens_per_epoch": None,
        "estimated_trained_tokens": None,
        "estimated_duration_seconds": None,
        "throughput_tokens_per_second": round(throughput.tokens_per_second, 1),
        "throughput_source": throughput.source,
    }
    if tokens is not None:
        processed = tokens["total_tokens"] * n_epochs
        if validation_tokens is not None:
            processed += validation_tokens["total_tokens"] * n_epochs * VALIDATION_COST
        out.update(
            tokens_per_epoch=tokens["total_tokens"],
            trained_tokens_per_epoch=tokens["trained_tokens"],
            estimated_trained_tokens=tokens["trained_tokens"] * n_epochs,
            processed_tokens=int(processed),
            estimated_duration_seconds=int(startup_seconds(entry) + processed / throughput.tokens_per_second),
        )
    return out
