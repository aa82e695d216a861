"""Serve-time compatibility before training: a job whose LoRA could not be served is refused.

``servable_hyperparameters`` fills the job's LoRA knobs with the base model's defaults and checks
them against the base's serving target (``catalog.ServingTarget``: max rank, target modules,
embedding adapters), so an adapter is never trained only to be rejected by the engines.
"""

from __future__ import annotations

from typing import Any

from loraforge.catalog import BaseModelEntry, Catalog
from loraforge.catalog.catalog import EMBEDDING_MODULES
from loraforge.contracts.train_spec import DEFAULT_DPO_BETA
from loraforge.errors import InvalidRequestError
from loraforge.jobs.params import JobCreateParams

ALL_LINEAR = "all-linear"
CODE = "lora_config_not_servable"


def hyperparameters_param(params: JobCreateParams) -> str:
    """Where the job's hyperparameters came from, as an error ``param`` prefix."""
    if params.method and params.method.supervised and params.method.supervised.hyperparameters:
        return "method.supervised.hyperparameters"
    if params.method and params.method.dpo and params.method.dpo.hyperparameters:
        return "method.dpo.hyperparameters"
    return "hyperparameters"


def _target_modules(requested: list[str] | None, entry: BaseModelEntry) -> list[str]:
    """The explicit module list: ``all-linear`` expands to the catalog's linear projections."""
    modules: list[str] = []
    for name in requested or [ALL_LINEAR]:
        modules += list(entry.lora.target_modules) if name == ALL_LINEAR else [name]
    return list(dict.fromkeys(modules))


def servable_hyperparameters(catalog: Catalog, base: str, params: JobCreateParams) -> dict[str, Any]:
    """The job's hyperparameters with LoRA defaults filled in, after checking they can be served.

    Args:
        catalog: the model catalog.
        base: the job's resolved base model id.
        params: the create request.

    Returns:
        The hyperparameters to store and echo on the job (``"auto"`` kept for the trio the
        trainer resolves; LoRA knobs, ``max_seq_length``, ``warmup_ratio``, ``weight_decay``
        concrete).

    Raises:
        InvalidRequestError: a LoRA setting the base's engines could not serve (400, ``param``
            names it, e.g. ``hyperparameters.lora_r``).
    """
    entry = catalog.get(base)
    assert entry is not None, base  # resolve_base_model ran first
    requested = params.requested_hyperparameters()
    where = hyperparameters_param(params)
    target = entry.serving
    hyper = requested.model_dump()
    if "beta" in hyper and hyper["beta"] == "auto":
        hyper["beta"] = DEFAULT_DPO_BETA  # OpenAI's "auto" for DPO, echoed on the job
    hyper.update(
        lora_r=entry.lora.r if requested.lora_r is None else requested.lora_r,
        lora_alpha=entry.lora.alpha if requested.lora_alpha is None else requested.lora_alpha,
        lora_dropout=entry.lora.dropout if requested.lora_dropout is None else requested.lora_dropout,
        lora_target_modules=_target_modules(requested.lora_target_modules, entry),
        max_seq_length=entry.max_seq_length if requested.max_seq_length is None else requested.max_seq_length,
        warmup_ratio=0.0 if requested.warmup_ratio is None else requested.warmup_ratio,
        weight_decay=0.0 if requested.weight_decay is None else requested.weight_decay,
    )
    if hyper["lora_r"] > target.max_lora_rank:
        raise InvalidRequestError(
            f"lora_r {hyper['lora_r']} cannot be served: the engines for {entry.id} accept LoRA ranks up "
            f"to {target.max_lora_rank}. Use lora_r <= {target.max_lora_rank}.",
            param=f"{where}.lora_r",
            code=CODE,
        )
    unsupported = [m for m in hyper["lora_target_modules"] if not target.supports_module(m)]
    if unsupported:
        embedding = [m for m in unsupported if m.rsplit(".", 1)[-1] in EMBEDDING_MODULES]
        why = "embedding/lm_head adapters are not served" if embedding else "unknown or unsupported modules"
        raise InvalidRequestError(
            f"lora_target_modules {unsupported} cannot be served for {entry.id} ({why}). Supported: "
            f"{', '.join(target.target_modules)} or '{ALL_LINEAR}'.",
            param=f"{where}.lora_target_modules",
            code=CODE,
        )
    if hyper["max_seq_length"] > entry.context_length:
        raise InvalidRequestError(
            f"max_seq_length {hyper['max_seq_length']} is longer than {entry.id}'s context length "
            f"{entry.context_length}.",
            param=f"{where}.max_seq_length",
            code="max_seq_length_too_long",
        )
    return hyper
