"""The trainer's JSON lines: one model per line ``python -m loraforge.trainer`` prints on stdout.

The trainer builds these models and hands them to an :data:`Emit` callback; its CLI prints each
as one line (:meth:`to_line`). The worker reads each line back with :func:`parse_event` and
dispatches on the model's class. The wire format is plain JSON, one object per line, with
``type`` naming the event:

* ``data_progress`` while the training file is prepared (share done, estimated seconds left),
  and once when it is ready;
* ``hyperparameters`` once, before training (the resolved OpenAI trio and the schedule);
* ``resumed`` when the run continues from a checkpoint (crash recovery, resume after pause);
* ``metrics`` every ``log_every`` steps, on the last step and whenever validation ran;
* ``checkpoint`` after each epoch-end checkpoint, and after the pause checkpoint;
* ``done`` last, once the adapter directory is in place;
* or ``paused`` last, when the pause file stopped the run (its checkpoint was saved);
* or ``error`` when the run failed.

A line that is not JSON, or not one of these events, makes :func:`parse_event` raise
``ValueError``; the worker logs and skips it (the run's outcome comes from its last line and exit
code, so a garbled line cannot end a job on its own).
"""

from __future__ import annotations

import json
from collections.abc import Callable, KeysView, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
    model_validator,
)


class StepMetrics(BaseModel):
    """The metrics of one optimizer step (or the latest of each metric, in ``done``).

    The names are OpenAI's (its metrics events and checkpoint objects carry the same keys).
    Validation metrics are present only when validation ran at that step: an absent one is
    ``None`` here and left out of the JSON. Other float metrics are kept as extra fields (a new
    training method adds its own, e.g. DPO's ``rewards/chosen``, without changing this model):
    read them with ``model_extra``.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    train_loss: float
    train_mean_token_accuracy: float
    # The validation sample (the first examples of the validation file), when it was evaluated.
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    # The whole validation file, evaluated once, on the last step.
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    # DPO (``train_loss``/``valid_loss`` are then the DPO loss): the mean implicit rewards
    # beta * (log pi - log pi_ref) of the chosen and rejected completions, the fraction of pairs
    # whose chosen reward is higher, and the mean margin chosen - rejected (TRL's rewards/*).
    train_rewards_chosen: float | None = None
    train_rewards_rejected: float | None = None
    train_rewards_accuracy: float | None = None
    train_rewards_margin: float | None = None
    valid_rewards_chosen: float | None = None
    valid_rewards_rejected: float | None = None
    valid_rewards_accuracy: float | None = None
    valid_rewards_margin: float | None = None
    full_valid_rewards_chosen: float | None = None
    full_valid_rewards_rejected: float | None = None
    full_valid_rewards_accuracy: float | None = None
    full_valid_rewards_margin: float | None = None
    # Extra metrics are numbers too; anything else is a malformed line.
    __pydantic_extra__: dict[str, float] = Field(init=False)

    @model_serializer(mode="wrap")
    def _present_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A metric that was not computed at this step is absent from the line, not null.
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class _Event(BaseModel):
    """One JSON line. Also readable as the JSON object it is on the wire.

    ``event["train_loss"]``, ``event.keys()`` and ``event == {...}`` read the line's JSON object,
    so scripts and tests that look at lines generically need no second representation; code that
    acts on events dispatches on the class and reads the attributes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_line(self) -> str:
        """The event as one JSON line (no newline), as the trainer prints it.

        Returns:
            The JSON text (``json.dumps``: NaN losses stay ``NaN``, as before these models).
        """
        return json.dumps(self.model_dump())

    def __getitem__(self, key: str) -> Any:
        return self.model_dump()[key]

    def keys(self) -> KeysView[str]:
        """The line's JSON keys, in order."""
        return self.model_dump().keys()

    def get(self, key: str, default: Any = None) -> Any:
        """The line's value at ``key``, or ``default`` when the line has no such key."""
        return self.model_dump().get(key, default)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return bool(self.model_dump() == dict(other))
        return super().__eq__(other)


class HyperparametersEvent(_Event):
    """Once, before training: the resolved hyperparameters and the run's size."""

    type: Literal["hyperparameters"] = "hyperparameters"
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    total_steps: int
    n_examples: int
    # Assistant tokens the loss is computed on, per epoch (trained_tokens = this x epochs).
    train_tokens_per_epoch: int
    # DPO runs only: their beta (absent from a supervised run's line).
    beta: float | None = None

    @model_serializer(mode="wrap")
    def _beta_if_dpo(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("beta") is None:
            data.pop("beta", None)
        return data


class ResumedEvent(_Event):
    """The run continues from a checkpoint of the same spec (crash recovery, resume after pause)."""

    type: Literal["resumed"] = "resumed"
    step: int
    epoch: int
    kind: Literal["epoch", "pause"]
    path: str


# The keys of a metrics line that say where the run is; every other key is a metric.
_POSITION_KEYS = frozenset({"type", "step", "total_steps", "epoch"})


class MetricsEvent(_Event):
    """One step's metrics. On the wire the metrics sit next to the position, in one flat object:
    ``{"type": "metrics", "step", "total_steps", "epoch", "train_loss", ...}``."""

    type: Literal["metrics"] = "metrics"
    step: int
    total_steps: int
    epoch: int
    metrics: StepMetrics

    @model_validator(mode="before")
    @classmethod
    def _nest_metrics(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "metrics" not in data:
            return {
                **{key: value for key, value in data.items() if key in _POSITION_KEYS},
                "metrics": {key: value for key, value in data.items() if key not in _POSITION_KEYS},
            }
        return data

    @model_serializer(mode="wrap")
    def _flatten_metrics(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        metrics = data.pop("metrics")
        return {**data, **metrics}


class CheckpointEvent(_Event):
    """A checkpoint directory was written (and older ones pruned).

    On the wire ``metrics`` repeats the step, ``{"step", "train_loss", ...}``: it is the
    checkpoint's OpenAI ``metrics`` object (:meth:`openai_metrics`).
    """

    type: Literal["checkpoint"] = "checkpoint"
    kind: Literal["epoch", "pause"]
    step: int
    epoch: int
    path: str
    metrics: StepMetrics
    # The checkpoint directories pruned to keep the last ``keep_checkpoints``.
    removed: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_repeated_step(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping):
            metrics = {key: value for key, value in data["metrics"].items() if key != "step"}
            return {**data, "metrics": metrics}
        return data

    @model_serializer(mode="wrap")
    def _repeat_step(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        data["metrics"] = {"step": self.step, **data["metrics"]}
        return data

    def openai_metrics(self) -> dict[str, Any]:
        """The checkpoint's metrics as OpenAI's checkpoint object carries them (with ``step``)."""
        metrics: dict[str, Any] = self.model_dump()["metrics"]
        return metrics


class DoneEvent(_Event):
    """The last line of a finished run: the adapter directory is in place."""

    type: Literal["done"] = "done"
    adapter_dir: str
    trained_tokens: int
    total_steps: int
    train_loss: float
    # The latest value of every metric (also in the adapter's manifest).
    metrics: StepMetrics
    resumed_from_step: int | None = None


class PausedEvent(_Event):
    """The last line of a paused run: the pause file appeared and a checkpoint was saved."""

    type: Literal["paused"] = "paused"
    step: int
    total_steps: int
    # The checkpoint the job resumes from (None: checkpoints are disabled for this run).
    checkpoint: str | None


class DataProgressEvent(_Event):
    """Before the first step, while the training file is tokenized (and once when it is ready)."""

    type: Literal["data_progress"] = "data_progress"
    # Share of the file prepared, 0..1 (1: ready).
    fraction: float
    elapsed_s: float
    # Estimated seconds until the data is ready (then the model loads and the first step runs).
    eta_s: float
    # Examples in the file: set on the last event (fraction 1) only.
    n_examples: int | None = None
    # Prepared by an earlier run of this job (a resume): nothing was tokenized.
    cached: bool = False


class ErrorEvent(_Event):
    """The last line of a failed run, with an OpenAI-style error code."""

    type: Literal["error"] = "error"
    # ``invalid_training_file`` / ``invalid_n_examples`` (bad data, exit code 2) or
    # ``training_error`` (anything else, exit code 1).
    code: str
    message: str
    # The request field at fault (``training_file``, ``validation_file``), if any.
    param: str | None = None


TrainerEvent = Annotated[
    DataProgressEvent
    | HyperparametersEvent
    | ResumedEvent
    | MetricsEvent
    | CheckpointEvent
    | DoneEvent
    | PausedEvent
    | ErrorEvent,
    Field(discriminator="type"),
]
"""Any line the trainer prints, told apart by ``type``."""

# How the trainer reports progress: called with each event, in order (the CLI prints them).
Emit = Callable[[TrainerEvent], None]

_EVENTS: TypeAdapter[TrainerEvent] = TypeAdapter(TrainerEvent)


def parse_event(line: str | bytes) -> TrainerEvent:
    """Read one line the trainer printed.

    Args:
        line: the JSON text (surrounding whitespace is ignored).

    Returns:
        The event, an instance of the model its ``type`` names.

    Raises:
        ValueError: the line is not JSON, names no known event type, or does not fit its event
            (``json.JSONDecodeError`` and ``pydantic.ValidationError`` are both ValueErrors).
    """
    # json.loads, like the trainer's json.dumps, reads NaN and Infinity (a diverged loss).
    return _EVENTS.validate_python(json.loads(line))
