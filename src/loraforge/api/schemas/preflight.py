"""loraforge's extension objects of a fine-tuning job: its pre-flight estimate, its memory plan,
and the dry run (``POST /v1/fine_tuning/jobs`` with ``"dry_run": true``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import MISSING

from loraforge.api.schemas.common import Number, ResponseObject, StoredObject


class FineTuningJobHyperparameters(StoredObject):
    """OpenAI's three (``"auto"`` until the trainer resolves them) and the LoRA knobs, as stored."""

    batch_size: Literal["auto"] | int | None | MISSING = MISSING
    learning_rate_multiplier: Literal["auto"] | Number | MISSING = MISSING
    n_epochs: Literal["auto"] | int | MISSING = MISSING
    lora_r: int | None | MISSING = MISSING
    lora_alpha: int | None | MISSING = MISSING
    lora_dropout: Number | None | MISSING = MISSING
    lora_target_modules: list[str] | None | MISSING = MISSING
    max_seq_length: int | None | MISSING = MISSING
    warmup_ratio: Number | None | MISSING = MISSING
    weight_decay: Number | None | MISSING = MISSING
    # DPO jobs: beta ("auto" is resolved to 0.1 at creation).
    beta: Literal["auto"] | Number | MISSING = MISSING


class FineTuneMethodParams(StoredObject):
    """``method.<type>``: the method's hyperparameters."""

    hyperparameters: FineTuningJobHyperparameters | MISSING = MISSING


class FineTuneMethod(StoredObject):
    """OpenAI's ``method``: ``{"type": ..., "<type>": {"hyperparameters": ...}}``."""

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: FineTuneMethodParams | MISSING = MISSING
    dpo: FineTuneMethodParams | MISSING = MISSING
    reinforcement: FineTuneMethodParams | MISSING = MISSING


class FineTuningJobError(ResponseObject):
    """Why a job failed (or, in a dry run, would fail)."""

    code: str
    message: str
    # The request field at fault (``training_file``, ``model``…); null when no single one is.
    param: str | None = None


class FineTuningJobEstimate(StoredObject):
    """What the job will do, from its files' pre-flight: resolved hyperparameters, steps, tokens,
    duration (``loraforge.preflight.estimate``)."""

    n_examples: int | MISSING = MISSING
    n_epochs: int | MISSING = MISSING
    batch_size: int | MISSING = MISSING
    learning_rate_multiplier: Number | MISSING = MISSING
    steps_per_epoch: int | MISSING = MISSING
    total_steps: int | MISSING = MISSING
    # The token counts and the duration are null when the base's tokenizer was not available.
    tokens_per_epoch: int | None | MISSING = MISSING
    trained_tokens_per_epoch: int | None | MISSING = MISSING
    # What the job reports as ``trained_tokens`` once it succeeds.
    estimated_trained_tokens: int | None | MISSING = MISSING
    estimated_duration_seconds: int | None | MISSING = MISSING
    throughput_tokens_per_second: Number | MISSING = MISSING
    # Where the throughput comes from: measured on past jobs of the base, or a default.
    throughput_source: str | MISSING = MISSING
    # Training and validation tokens the run processes (absent without token counts).
    processed_tokens: int | MISSING = MISSING


class FineTuningJobPlan(ResponseObject):
    """The memory plan chosen at creation (``loraforge.jobs.placement.public_plan``).

    Every key is present; a value is null when a plan stored by an older version lacks it.
    """

    pool: str | None
    device: str | None
    strategy: Literal["lora", "qlora", "fsdp"] | None
    num_gpus: int | None
    # Real tokens per packed micro-batch; null: one micro-batch per optimizer step.
    token_budget: int | None
    gradient_checkpointing: bool | None
    checkpoint_layers: int | None
    estimated_peak_gib: Number | None
    breakdown_gib: dict[str, Number] | None
    summary: str | None


class FileCheckIssue(ResponseObject):
    """One problem in a file: ``line`` is 1-based (null for the whole file), ``path`` a JSON path."""

    line: int | None
    path: str | None
    code: str
    message: str


class FileTokenStats(ResponseObject):
    """Token accounting with the base model's tokenizer and chat template (after truncation)."""

    total_tokens: int
    trained_tokens: int
    longest_example_tokens: int
    longest_example_line: int | None
    truncated_examples: int
    max_seq_length: int


class FileCheckReport(ResponseObject):
    """The pre-flight of one file (``loraforge.preflight.report.FileReport``)."""

    format: Literal["chat", "preference", "prompt_completion"] | None
    bytes: int
    n_lines: int
    n_examples: int
    valid: bool
    n_errors: int
    errors: list[FileCheckIssue]
    n_warnings: int
    warnings: list[FileCheckIssue]
    tokens: FileTokenStats | None
    # Why tokens were not counted (tokenizer not available).
    tokens_unavailable: str | None


class DryRunMethod(ResponseObject):
    """The dry run's ``method``: only its type."""

    type: Literal["supervised", "dpo", "reinforcement"]


class DryRunHyperparameters(ResponseObject):
    """OpenAI's three as the job would use them: resolved by the estimate, else as requested."""

    n_epochs: Literal["auto"] | int
    batch_size: Literal["auto"] | int
    learning_rate_multiplier: Literal["auto"] | Number


class FineTuningJobDryRun(ResponseObject):
    """The answer to a dry run: shaped like the job it would create, so the SDK parses it as a
    ``FineTuningJob``; nothing is stored."""

    object: Literal["fine_tuning.job.dry_run"] = "fine_tuning.job.dry_run"
    model: str
    method: DryRunMethod
    training_file: str | None
    validation_file: str | None
    # Whether the job would pass its pre-flight; ``error`` is what it would fail with otherwise.
    valid: bool
    error: FineTuningJobError | None
    hyperparameters: DryRunHyperparameters
    estimate: FineTuningJobEstimate | None
    training_file_report: FileCheckReport
    validation_file_report: FileCheckReport | None
    created_at: int
    plan: FineTuningJobPlan | None


def dry_run_public(report: dict[str, Any]) -> FineTuningJobDryRun:
    """The dry run's answer from ``jobs.service.dry_run_job``'s report."""
    return FineTuningJobDryRun.model_validate(report)
