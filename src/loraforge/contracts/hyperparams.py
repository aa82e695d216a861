"""Resolve ``"auto"`` hyperparameters the way the OpenAI fine-tuning API does (pure, no torch).

One set of rules for every process: the trainer resolves a run's hyperparameters with them, and
the API's pre-flight estimate (``preflight/estimate.py``) predicts the same steps and epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from loraforge.catalog.catalog import BaseModelEntry
    from loraforge.contracts.train_spec import Hyperparameters

# OpenAI cookbook ("Data preparation and analysis for chat model fine-tuning"): aim for ~3 epochs,
# but see at least 100 and at most 25,000 examples in total.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
# batch_size "auto": one fifth of the examples (so an epoch is at least ~5 steps), capped by the
# catalog entry's max_batch_size (what fits the model's training target in memory).
AUTO_BATCH_DIVISOR = 5


class ResolvedHyperparameters(BaseModel):
    """The concrete values a run uses (reported to the user and stored in the manifest)."""

    model_config = ConfigDict(frozen=True)

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float


def auto_n_epochs(n_examples: int) -> int:
    """The OpenAI cookbook epoch rule.

    Target 3 epochs; if that is fewer than 100 examples seen in total, use
    ``min(25, 100 // n)``; if it is more than 25,000, use ``max(1, 25000 // n)``.

    Args:
        n_examples: number of training examples (> 0).

    Returns:
        The number of epochs.
    """
    n = max(1, n_examples)
    if n * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n)
    if n * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n)
    return TARGET_EPOCHS


def auto_batch_size(n_examples: int, max_batch_size: int) -> int:
    """``clamp(n_examples // 5, 1, max_batch_size)``.

    Args:
        n_examples: number of training examples.
        max_batch_size: the catalog entry's largest batch.

    Returns:
        The batch size.
    """
    return max(1, min(n_examples // AUTO_BATCH_DIVISOR, max_batch_size))


def resolve_hyperparameters(
    requested: Hyperparameters, n_examples: int, entry: BaseModelEntry
) -> ResolvedHyperparameters:
    """Replace every ``"auto"`` in ``requested`` with a concrete value.

    Rules (explicit values are kept as given):

    * ``n_epochs``: :func:`auto_n_epochs` (OpenAI cookbook: 3, raised so that at least 100
      examples are seen, capped at 25; lowered so that at most 25,000 are seen, at least 1).
    * ``batch_size``: :func:`auto_batch_size`, ``clamp(n_examples // 5, 1, entry.max_batch_size)``.
    * ``learning_rate_multiplier``: 1.0.
    * ``learning_rate`` = ``entry.base_learning_rate * learning_rate_multiplier``.

    Args:
        requested: the job's hyperparameters (values or ``"auto"``).
        n_examples: number of training examples.
        entry: the base model's catalog entry (base learning rate, max batch size).

    Returns:
        The resolved hyperparameters.
    """
    n_epochs = auto_n_epochs(n_examples) if requested.n_epochs == "auto" else int(requested.n_epochs)
    batch_size = (
        auto_batch_size(n_examples, entry.max_batch_size)
        if requested.batch_size == "auto"
        else int(requested.batch_size)
    )
    multiplier = (
        1.0 if requested.learning_rate_multiplier == "auto" else float(requested.learning_rate_multiplier)
    )
    return ResolvedHyperparameters(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate_multiplier=multiplier,
        learning_rate=entry.base_learning_rate * multiplier,
    )


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: ``ceil(n_examples / batch_size)`` (the last batch may be short).

    Args:
        n_examples: number of training examples.
        batch_size: examples per step.

    Returns:
        The number of steps.
    """
    return math.ceil(n_examples / batch_size)
