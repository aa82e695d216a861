"""The body of ``POST /v1/fine_tuning/jobs``, validated with OpenAI's ranges.

Unknown fields are rejected (OpenAI: "Unrecognized request argument supplied"), and ``null`` is
accepted for every optional field, as the SDK sends it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from loraforge.contracts.ranges import explained, int_range

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Each refusal says the whole range and the value sent (``contracts.ranges.explained``).
    batch_size: Annotated[
        Auto | Annotated[int, Field(ge=1, le=256)], explained(f"'auto' or {int_range(1, 256)}")
    ] = "auto"
    learning_rate_multiplier: Annotated[
        Auto | Annotated[float, Field(gt=0, le=100)],
        explained("'auto' or a number greater than 0 and at most 100"),
    ] = "auto"
    n_epochs: Annotated[
        Auto | Annotated[int, Field(ge=1, le=50)], explained(f"'auto' or {int_range(1, 50)}")
    ] = "auto"
    # LoRA knobs and schedule (Together / Nebius names); None means the base model's default from
    # the catalog, filled in at creation. Whether the engines can serve the result is checked
    # against the base's serving target by ``jobs/compat.py``.
    lora_r: Annotated[Annotated[int, Field(ge=1, le=1024)] | None, explained(int_range(1, 1024))] = None
    lora_alpha: Annotated[Annotated[int, Field(ge=1, le=4096)] | None, explained(int_range(1, 4096))] = None
    lora_dropout: Annotated[
        Annotated[float, Field(ge=0.0, lt=1.0)] | None, explained("a number from 0 up to (not including) 1")
    ] = None
    # Module names, or "all-linear" (every linear projection of a block, the default).
    lora_target_modules: Annotated[
        Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)] | None,
        explained("'all-linear', or a non-empty list (or comma-separated string) of module names"),
    ] = None
    max_seq_length: Annotated[
        Annotated[int, Field(ge=8)] | None,
        explained("an integer of at least 8 (and at most the base model's context length)"),
    ] = None
    warmup_ratio: Annotated[
        Annotated[float, Field(ge=0.0, le=1.0)] | None, explained("a number from 0 to 1")
    ] = None
    weight_decay: Annotated[
        Annotated[float, Field(ge=0.0, le=10.0)] | None, explained("a number from 0 to 10")
    ] = None

    @field_validator("batch_size", "n_epochs", "learning_rate_multiplier", mode="before")
    @classmethod
    def _none_is_auto(cls, value: Any) -> Any:
        return "auto" if value is None else value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _modules_list(cls, value: Any) -> Any:
        # Together takes "all-linear" or a comma-separated string; OpenAI-style clients send lists.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or [value]
        return value


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    """OpenAI's ``FineTuneDPOHyperparameters``: the supervised ones plus ``beta`` in (0, 2]."""

    beta: Annotated[
        Auto | Annotated[float, Field(gt=0, le=2)],
        explained("'auto' or a number greater than 0 and at most 2"),
    ] = "auto"

    @field_validator("beta", mode="before")
    @classmethod
    def _none_beta_is_auto(cls, value: Any) -> Any:
        return "auto" if value is None else value


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class WandbIntegration(BaseModel):
    """OpenAI's ``FineTuningIntegration.wandb``: where the job's W&B run goes."""

    model_config = ConfigDict(extra="forbid")

    project: Name
    name: Name | None = None
    entity: Name | None = None
    tags: Annotated[
        Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]], Field(max_length=20)]
        | None,
        explained("a list of at most 20 tags of 1 to 64 characters"),
    ] = None


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbIntegration


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1)]
    training_file: Annotated[str, StringConstraints(min_length=1)]
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Annotated[
        Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")] | None,
        explained("1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'"),
    ] = None
    seed: Annotated[
        Annotated[int, Field(ge=0, le=2147483647)] | None, explained(int_range(0, 2147483647))
    ] = None
    metadata: Annotated[
        Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None,
        explained("an object of at most 16 string keys (64 characters) and string values (512)"),
    ] = None
    # One W&B run per job; the org's key is set apart (``/v1/organization/integrations/wandb``).
    integrations: Annotated[list[Integration], Field(max_length=1)] | None = None
    # loraforge extension: validate the files and estimate the run without creating a job.
    dry_run: bool | None = None

    def method_type(self) -> str:
        """``method.type``; ``supervised`` when no method is given."""
        return self.method.type if self.method is not None else "supervised"

    def requested_hyperparameters(self) -> Hyperparameters:
        """``method.<type>.hyperparameters`` if given, else the legacy top-level field (a DPO job:
        as :class:`DpoHyperparameters`, ``beta`` ``"auto"`` unless given)."""
        if self.method and self.method.type == "dpo":
            if self.method.dpo and self.method.dpo.hyperparameters:
                return self.method.dpo.hyperparameters
            return DpoHyperparameters(**(self.hyperparameters.model_dump() if self.hyperparameters else {}))
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()
