"""Selective activation checkpointing: the plan's ``k`` decoder layers recompute, the rest keep.

``TrainPlan.checkpointed_layers(L)`` says how many of the ``L`` decoder layers recompute their
activations in backward (torchtune's "selective AC" lever, PERF.md §8): all of them costs about a
third to a half more compute for LoRA, and most plans only need some of that memory back.

Which ``k``: the **first** ``k`` layers (0 .. k-1). Every layout saves the same total at the end of
the forward pass, ``(L - k) * A + k * a * h`` per token (planner/memory.py), but the layout decides
what the backward pass adds on top of it. Backward runs from the last layer down, and a layer that
keeps its activations only needs its gradient workspace (about one ``A``) while a checkpointed
one needs its recomputed activations too (about ``2A``). With the first ``k`` checkpointed the
last ``L - k`` layers run backward first, each freeing its ``A`` before the next one starts, so by
the time the first recompute happens ``L - k`` layers' activations are gone: the peak stays
``saved + A`` per token. Spread evenly (every ``L/k``-th) or last-``k``, the last layer is
checkpointed and its ``2A`` lands on the full saved set: one more ``A`` per token (1.4 GiB on 8B
at 8k tokens) for nothing. The early layers are also the ones whose activations live longest
(from their forward to the very end of the backward), so they are the natural ones to drop.

How: transformers 5.x decoder layers are ``GradientCheckpointingLayer``s whose ``forward``
checkpoints when ``self.gradient_checkpointing and self.training`` (5.17 and 5.24 alike).
``activation_checkpointing_enable`` (5.24; ``gradient_checkpointing_enable`` where it is absent)
sets the checkpoint function and the flag on every layer; then the flag is cleared on the layers
that keep their activations. The layers are found through the PEFT wrapper
(``get_base_model().get_decoder().layers``). The flags are set before
:func:`~loraforge.trainer.device_setup.prepare_for_training` compiles each layer, and the flag is
an instance attribute the compiled ``forward`` reads while tracing (and guards on), so a
compiled layer traces the variant its flag selects (two graphs in all: checkpointed and not).
"""

from __future__ import annotations

import inspect
from typing import Any

from loraforge.contracts.train_spec import TrainPlan


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers causal LM, PEFT-wrapped or not.

    Args:
        model: a ``PeftModel`` or a transformers ``PreTrainedModel``.

    Returns:
        The layers, first to last.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.get_decoder().layers)


def checkpointed_indices(num_checkpointed: int, num_layers: int) -> list[int]:
    """Indices of the layers that recompute: the first ``num_checkpointed`` (module docstring).

    Args:
        num_checkpointed: ``k``, clamped to ``[0, num_layers]``.
        num_layers: ``L``.

    Returns:
        ``[0, 1, ..., k - 1]``.
    """
    return list(range(max(0, min(num_checkpointed, num_layers))))


def _enable_on_model(model: Any) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}  # works with frozen inputs and with compile
    # The 5.24 name first (there ``gradient_checkpointing_enable`` is a deprecated alias), but only
    # with the keyword it takes there: the GPU machines run 5.17, whose API is not checked here.
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_activation_checkpointing(model: Any, plan: TrainPlan) -> list[int]:
    """Make exactly the plan's ``k`` first decoder layers recompute their activations.

    Also undoes a model-wide enable done earlier (PEFT's ``prepare_model_for_kbit_training``
    turns it on for every layer under QLoRA): the layers outside the first ``k`` are switched off.

    Args:
        model: the PEFT model (or the plain transformers model).
        plan: the run's memory plan (``checkpoint_layers`` / ``gradient_checkpointing``).

    Returns:
        The indices of the checkpointed layers.
    """
    layers = decoder_layers(model)
    chosen = checkpointed_indices(plan.checkpointed_layers(len(layers)), len(layers))
    if chosen:
        _enable_on_model(model)
    keep = set(chosen)
    for index, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = index in keep
    return chosen
