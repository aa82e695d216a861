"""The LoRA trainer: a pure function, ``train(spec, emit)``, and its CLI.

``python -m loraforge.trainer SPEC.json`` prints one JSON object per line on stdout (everything
else goes to stderr):

* ``{"type": "hyperparameters", "n_epochs", "batch_size", "learning_rate_multiplier",
  "learning_rate", "total_steps", "n_examples", "train_tokens_per_epoch"}`` once, before training;
* ``{"type": "resumed", "step", "epoch", "kind", "path"}`` when the run continues from a
  checkpoint in ``checkpoint_dir`` (crash recovery, resume after pause);
* ``{"type": "metrics", "step", "total_steps", "epoch", "train_loss",
  "train_mean_token_accuracy"}`` every ``log_every`` steps and on the last step, with
  ``"valid_loss"``/``"valid_mean_token_accuracy"`` added whenever validation ran (each epoch
  end and every ``eval_every`` steps) and ``"full_valid_loss"``/``"full_valid_mean_token_accuracy"``
  on the last step, when there is a validation file;
* ``{"type": "checkpoint", "kind": "epoch"|"pause", "step", "epoch", "path", "metrics",
  "removed"}`` after each epoch-end checkpoint (and the pause checkpoint); ``removed`` lists
  the checkpoint directories pruned to keep the last ``keep_checkpoints``;
* ``{"type": "done", "adapter_dir", "trained_tokens", "total_steps", "train_loss", "metrics",
  "resumed_from_step"}`` last;
* or ``{"type": "paused", "step", "total_steps", "checkpoint"}`` last, when ``pause_file``
  appeared (a checkpoint was saved at that step);
* or ``{"type": "error", "code", "message", "param"}`` on failure.

Exit codes: 0 done or paused, 2 invalid training data (``invalid_training_file``/
``invalid_n_examples``), 1 any other error (``training_error``), 143 stopped by SIGTERM (no
adapter written, no line).

Importing this package does not import torch: ``spec``, ``hyperparams`` and ``data`` are pure, and
``train`` is loaded from ``recipe`` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.trainer.data import TrainingDataError, read_chat_jsonl
from loraforge.trainer.hyperparams import ResolvedHyperparameters, resolve_hyperparameters, steps_per_epoch
from loraforge.trainer.spec import Hyperparameters, TrainSpec, load_spec

if TYPE_CHECKING:
    from loraforge.trainer.recipe import train

__all__ = [
    "Hyperparameters",
    "ResolvedHyperparameters",
    "TrainSpec",
    "TrainingDataError",
    "load_spec",
    "read_chat_jsonl",
    "resolve_hyperparameters",
    "steps_per_epoch",
    "train",
]


def __getattr__(name: str) -> Any:
    # ``train`` pulls in torch/transformers/peft: load it only when asked for.
    if name == "train":
        from loraforge.trainer.recipe import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
