"""The LoRA trainer: a pure function, ``train(spec, emit)``, and its CLI.

``python -m loraforge.trainer SPEC.json`` reads a :class:`~loraforge.contracts.train_spec.TrainSpec`
and prints one JSON line per :mod:`loraforge.contracts.trainer_events` event on stdout
(``data_progress``, ``hyperparameters``, ``resumed``, ``metrics``, ``checkpoint``, then ``done``,
``paused`` or ``error``; the shapes are the models there). Everything else goes to stderr. The
worker starts it as :mod:`loraforge.contracts.trainer_launch` says.

Exit codes: 0 done or paused, 2 invalid training data (``invalid_training_file``/
``invalid_n_examples``), 1 any other error (``training_error``), 143 stopped by SIGTERM (no
adapter written, no line).

The modules, in the order a run uses them:

* ``__main__``: the CLI. Reads the spec, keeps stdout for the JSON lines, dies with the worker,
  holds the run's lock, maps failures to the ``error`` event and the exit code.
* ``recipe``: ``train(spec, emit)``, the recipe read top to bottom: ``setup`` (``_setup_data``,
  ``_setup_model``, ``_setup_optimizer``), the loop, ``save``, ``cleanup``.
* ``data``: chat JSONL -> validated messages -> tokenized examples with assistant-only labels
  (the definitions the pre-flight shares); :class:`TrainingDataError` (the ``error`` event of a
  bad file).
* ``dataset``: the file prepared as memory-mapped Arrow (batched tokenization in ``num_proc``
  processes), cached with the run so a resume reuses it; :class:`~.dataset.ArrowExamples`.
* ``device_setup`` (with ``kernels``, ``recompute``): device, dtype, attention, QLoRA, Liger
  kernels, activation recompute of the first k layers, compile, the optimizer.
* ``start``: where the LoRA weights start: this spec's newest checkpoint (``checkpointer``),
  ``spec.init_adapter``, or a fresh seeded init.
* ``training_run``: :class:`TrainingRun`, the three setup parts and the loop's state.
* ``loop``: the optimisation loop: steps, validation, ``metrics`` and ``checkpoint`` events,
  epoch checkpoints, pause.
* ``packing`` -> ``step`` -> ``loss``: one step's micro-batches (padding-free packing within a
  token budget, sharded across ranks), their forward/backward, the assistant-token loss.
* ``dpo_data`` -> ``dpo_logps`` -> ``dpo``: a DPO run (``spec.method == "dpo"``): preference
  lines -> tokenized pairs (completion tokens labelled); both sides of a pair in one micro-batch
  and their per-sequence log-probs; the step (TRL's sigmoid loss, the reward metrics) and the
  reference log-probs of the starting model, computed once and kept in checkpoints.
* ``distributed``: what changes under ``accelerate launch`` (FSDP): collectives, gathering the
  adapter and optimizer state, rank 0 writes.
* ``checkpointer``: checkpoint directories (a servable adapter plus the training state): write,
  find, prune, RNG states.

What the trainer shares with other processes lives in :mod:`loraforge.contracts` (the spec, the
hyperparameter rules, the events, the launch command), never here. Importing this package does
not import torch: ``train`` is loaded from ``recipe`` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.trainer.data import TrainingDataError, read_chat_jsonl

if TYPE_CHECKING:
    from loraforge.trainer.recipe import train

__all__ = ["TrainingDataError", "read_chat_jsonl", "train"]


def __getattr__(name: str) -> Any:
    # ``train`` pulls in torch/transformers/peft: load it only when asked for.
    if name == "train":
        from loraforge.trainer.recipe import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
