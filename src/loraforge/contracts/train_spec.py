"""The training spec: the one JSON file the worker writes and ``python -m loraforge.trainer`` reads.

Pure (no torch): the worker builds a :class:`TrainSpec` and dumps it with ``model_dump_json()``;
the memory planner writes its :class:`TrainPlan`; the API validates the OpenAI
:class:`Hyperparameters` with it. Unknown keys are rejected, so a mismatch between writer and
reader fails loudly (in the worker, which fails the job) instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# OpenAI's ``beta: "auto"`` for DPO (TRL's default too).
DEFAULT_DPO_BETA = 0.1


class Hyperparameters(BaseModel):
    """The OpenAI ``hyperparameters`` object; ``"auto"`` is resolved by the trainer.

    Bounds follow the OpenAI fine-tuning API (n_epochs 1-50, batch_size 1-256).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int | Literal["auto"] = Field(default="auto", union_mode="left_to_right")
    batch_size: int | Literal["auto"] = Field(default="auto", union_mode="left_to_right")
    learning_rate_multiplier: float | Literal["auto"] = Field(default="auto", union_mode="left_to_right")

    @model_validator(mode="after")
    def _check_bounds(self) -> Hyperparameters:
        if self.n_epochs != "auto" and not 1 <= self.n_epochs <= 50:
            raise ValueError(f"n_epochs must be between 1 and 50, got {self.n_epochs}")
        if self.batch_size != "auto" and not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size must be between 1 and 256, got {self.batch_size}")
        lrm = self.learning_rate_multiplier
        if lrm != "auto" and not 0 < lrm <= 10:
            raise ValueError(f"learning_rate_multiplier must be in (0, 10], got {lrm}")
        return self


class TrainPlan(BaseModel):
    """How a run uses its accelerator: written by the memory planner, read by the trainer.

    The planner (:mod:`loraforge.planner`) chooses it at job creation from the model's size, the
    LoRA config, the context length and the worker pool's accelerator memory; the default is the
    plain single-device bf16/fp32 LoRA path the CPU tests use.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "lora": bf16 (fp32 on CPU) base + LoRA on one device; "qlora": 4-bit NF4 base on one GPU;
    # "fsdp": bf16 base sharded over num_gpus GPUs (accelerate launch with configs/accelerate/).
    strategy: Literal["lora", "qlora", "fsdp"] = "lora"
    num_gpus: int = Field(default=1, ge=0)
    # Real (non-padding) tokens per packed micro-batch; None means one micro-batch per optimizer
    # step (all of the step's examples at once), the CPU default.
    token_budget: int | None = Field(default=None, ge=8)
    # Recompute activations in backward; only when the memory plan needs it. True when any decoder
    # layer recomputes (``checkpoint_layers`` says how many; None: all of them).
    gradient_checkpointing: bool = False
    # Decoder layers that recompute their activations in backward (the first k, see
    # trainer/recompute.py); None follows ``gradient_checkpointing`` (all layers or none), 0 is none.
    # Given alone it sets ``gradient_checkpointing`` (k > 0); given with it, the two must agree.
    checkpoint_layers: int | None = Field(default=None, ge=0)
    # Padding-free packing: the step's examples concatenated with restarting position ids.
    packing: bool = True
    # torch.compile the model (GPU only; ignored on CPU).
    compile: bool = False
    # "auto": chunked linear cross-entropy on CUDA (fused kernel when available), plain on CPU.
    loss: Literal["auto", "chunked", "full"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _derive_gradient_checkpointing(cls, data: Any) -> Any:
        # checkpoint_layers alone is enough to say whether recompute is on. Only an int is
        # compared here: anything else (a string, a float) is left to the field's own validation,
        # which raises a ValidationError, not a raw TypeError from inside this validator.
        k = data.get("checkpoint_layers") if isinstance(data, dict) else None
        if isinstance(k, int) and not isinstance(k, bool):
            data = {"gradient_checkpointing": k > 0, **data}
        return data

    @model_validator(mode="after")
    def _check_checkpointing(self) -> TrainPlan:
        k = self.checkpoint_layers
        if k is not None and self.gradient_checkpointing != (k > 0):
            raise ValueError(
                f"gradient_checkpointing={self.gradient_checkpointing} contradicts checkpoint_layers={k} "
                "(gradient_checkpointing is true exactly when some layer recomputes)"
            )
        return self

    def checkpointed_layers(self, num_layers: int) -> int:
        """How many of ``num_layers`` decoder layers recompute their activations.

        Args:
            num_layers: the model's decoder layers.

        Returns:
            ``checkpoint_layers`` (at most ``num_layers``), or all/none by ``gradient_checkpointing``.
        """
        if self.checkpoint_layers is None:
            return num_layers if self.gradient_checkpointing else 0
        return min(self.checkpoint_layers, num_layers)


# Written last into each prepared data directory under ``data_dir/<cache key>``: a directory
# without it is incomplete (the trainer's ``dataset.py`` writes it, the worker's ``data_sync.py``
# mirrors only such directories to the object store).
DATA_PREPARED = "prepared.json"


class TrainSpec(BaseModel):
    """Everything one training run needs; the same spec gives the same adapter (on CPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    # Public catalog id (or alias), e.g. "loraforge/tiny-llama".
    base_model: str
    # Path to models.yaml; None means the repository's configs/models.yaml.
    models_config: str | None = None
    # Where builtin models (builtin:tiny-llama) are built; passed to catalog.loading.
    models_dir: str
    # Local paths of chat JSONL files ({"messages": [...]} per line).
    training_file: str
    validation_file: str | None = None
    # The adapter directory to create (written to a sibling temp dir, then renamed).
    output_dir: str
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = 42
    # LoRA overrides; None means the catalog entry's defaults.
    lora_r: int | None = Field(default=None, ge=1)
    lora_alpha: int | None = Field(default=None, ge=1)
    lora_dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    lora_target_modules: list[str] | None = None
    # Longest tokenized example kept (longer ones are cut at the end); None means the catalog's.
    max_seq_length: int | None = Field(default=None, ge=8)
    # Linear LR warmup over this fraction of the steps, then constant; 0 means no warmup.
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    # AdamW weight decay on the LoRA parameters.
    weight_decay: float = Field(default=0.0, ge=0.0)
    # Emit a metrics line every N optimizer steps (and always on the last step).
    log_every: int = Field(default=1, ge=1)
    # torch.set_num_threads(n) when n > 0; 0 leaves torch's default.
    torch_threads: int = Field(default=0, ge=0)
    # "auto" (cuda if available, else cpu), "cpu" or "cuda".
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Evaluate on the validation sample every N steps as well as at each epoch end (0: epoch ends only).
    eval_every: int = Field(default=0, ge=0)
    # Where checkpoints go (one directory per checkpoint, each a valid adapter directory plus the
    # training state); None disables checkpoints, pausing with a checkpoint and resuming.
    checkpoint_dir: str | None = None
    # Epoch-end checkpoints kept on disk (OpenAI keeps the last 3 epochs').
    keep_checkpoints: int = Field(default=3, ge=1)
    # When this file exists the trainer saves a checkpoint at the next step boundary and stops.
    pause_file: str | None = None
    # Continued fine-tuning: start from this adapter directory instead of a fresh LoRA init.
    init_adapter: str | None = None
    # The memory plan (strategy, micro-batch token budget, recompute); see TrainPlan.
    plan: TrainPlan = Field(default_factory=TrainPlan)
    # Where the tokenized data is cached (Arrow, keyed by file, tokenizer, template, length and
    # method) so a resumed run reuses it; None: a temporary directory removed after the run.
    data_dir: str | None = None
    # Processes that tokenize the files (0: one per CPU this process may use).
    data_num_proc: int = Field(default=0, ge=0)
    # "supervised": chat files, cross-entropy on assistant tokens; "dpo": preference files, the
    # DPO loss against the starting model (trainer/dpo.py), with ``dpo_beta`` (OpenAI: (0, 2]).
    method: Literal["supervised", "dpo"] = "supervised"
    dpo_beta: float | None = Field(default=None, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _check_method(self) -> TrainSpec:
        if self.method == "supervised" and self.dpo_beta is not None:
            raise ValueError("dpo_beta is only for method 'dpo'")
        return self

    def beta(self) -> float:
        """DPO's beta (``DEFAULT_DPO_BETA`` when the spec leaves it out)."""
        return DEFAULT_DPO_BETA if self.dpo_beta is None else self.dpo_beta

    def fingerprint(self, resolved: dict[str, Any] | None = None) -> str:
        """SHA-256 of what decides the training trajectory (not where files go or how it is run).

        A checkpoint is resumed only by a run with the same fingerprint.

        Args:
            resolved: the resolved hyperparameters, used instead of the requested ones (the
                worker writes the resolved values back to the job, so a resumed run's spec says
                ``4`` where the first run's said ``"auto"``).

        Returns:
            The hex digest.
        """
        volatile = {
            "job_id",
            "models_config",
            "models_dir",
            "output_dir",
            "log_every",
            "torch_threads",
            "device",
            "checkpoint_dir",
            "keep_checkpoints",
            "pause_file",
            "eval_every",
            "data_dir",
            "data_num_proc",
            # How the math is laid out on the device, not what it computes.
            "plan",
        }
        # A supervised spec leaves the DPO fields out: its fingerprint is what it was before them.
        if self.method == "supervised":
            volatile |= {"method", "dpo_beta"}
        fields = self.model_dump(mode="json", exclude=volatile)
        if resolved is not None:
            fields["hyperparameters"] = resolved
        # Where an input sits on this machine is not what it is: a job resumes on another host,
        # whose cache of the store has other paths. The last two parts name the input
        # (``{org}/{file_id}``, ``adapters/{job_id}``, ``{job_id}/step-N``) on every host.
        for key in ("training_file", "validation_file", "init_adapter"):
            if fields.get(key):
                fields[key] = "/".join(PurePosixPath(str(fields[key])).parts[-2:])
        canonical = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def spec_hash(self) -> str:
        """SHA-256 of the spec's canonical JSON (sorted keys), recorded in the adapter manifest.

        Returns:
            The hex digest.
        """
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_spec(path: str | Path) -> TrainSpec:
    """Read and validate a spec JSON file.

    Args:
        path: the JSON file written by the worker.

    Returns:
        The validated spec.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        pydantic.ValidationError: the file is not a valid spec.
    """
    return TrainSpec.model_validate_json(Path(path).read_text())
