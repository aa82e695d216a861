"""The trainer's JSON lines as typed events: every event survives the wire unchanged, the wire keeps
its documented shape, and a line that is not an event is refused with a ValueError."""

from __future__ import annotations

import json

import pytest

from loraforge.contracts.trainer_events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    HyperparametersEvent,
    MetricsEvent,
    PausedEvent,
    ResumedEvent,
    StepMetrics,
    TrainerEvent,
    parse_event,
)

STEP = StepMetrics(train_loss=0.5, train_mean_token_accuracy=0.75)
VALIDATED = StepMetrics(
    train_loss=0.5,
    train_mean_token_accuracy=0.75,
    valid_loss=0.625,
    valid_mean_token_accuracy=0.7,
    full_valid_loss=0.6,
    full_valid_mean_token_accuracy=0.71,
)

# One of each event, as the trainer builds them, with the JSON object each must print.
EVENTS: list[tuple[TrainerEvent, dict[str, object]]] = [
    (
        HyperparametersEvent(
            n_epochs=3,
            batch_size=4,
            learning_rate_multiplier=1.0,
            learning_rate=0.005,
            total_steps=9,
            n_examples=12,
            train_tokens_per_epoch=216,
        ),
        {
            "type": "hyperparameters",
            "n_epochs": 3,
            "batch_size": 4,
            "learning_rate_multiplier": 1.0,
            "learning_rate": 0.005,
            "total_steps": 9,
            "n_examples": 12,
            "train_tokens_per_epoch": 216,
        },
    ),
    (
        ResumedEvent(step=5, epoch=2, kind="pause", path="/runs/ckpt/step-0000005"),
        {"type": "resumed", "step": 5, "epoch": 2, "kind": "pause", "path": "/runs/ckpt/step-0000005"},
    ),
    (
        MetricsEvent(step=2, total_steps=9, epoch=1, metrics=STEP),
        {
            "type": "metrics",
            "step": 2,
            "total_steps": 9,
            "epoch": 1,
            "train_loss": 0.5,
            "train_mean_token_accuracy": 0.75,
        },
    ),
    (
        MetricsEvent(step=9, total_steps=9, epoch=3, metrics=VALIDATED),
        {
            "type": "metrics",
            "step": 9,
            "total_steps": 9,
            "epoch": 3,
            "train_loss": 0.5,
            "train_mean_token_accuracy": 0.75,
            "valid_loss": 0.625,
            "valid_mean_token_accuracy": 0.7,
            "full_valid_loss": 0.6,
            "full_valid_mean_token_accuracy": 0.71,
        },
    ),
    (
        CheckpointEvent(
            kind="epoch", step=6, epoch=2, path="/c/step-0000006", metrics=STEP, removed=["/c/step-0000003"]
        ),
        {
            "type": "checkpoint",
            "kind": "epoch",
            "step": 6,
            "epoch": 2,
            "path": "/c/step-0000006",
            "metrics": {"step": 6, "train_loss": 0.5, "train_mean_token_accuracy": 0.75},
            "removed": ["/c/step-0000003"],
        },
    ),
    (
        DoneEvent(
            adapter_dir="/a/ftjob-1",
            trained_tokens=648,
            total_steps=9,
            train_loss=0.5,
            metrics=VALIDATED,
            resumed_from_step=None,
        ),
        {
            "type": "done",
            "adapter_dir": "/a/ftjob-1",
            "trained_tokens": 648,
            "total_steps": 9,
            "train_loss": 0.5,
            "metrics": VALIDATED.model_dump(),
            "resumed_from_step": None,
        },
    ),
    (
        PausedEvent(step=5, total_steps=12, checkpoint=None),
        {"type": "paused", "step": 5, "total_steps": 12, "checkpoint": None},
    ),
    (
        ErrorEvent(code="invalid_n_examples", message="too few", param="training_file"),
        {"type": "error", "code": "invalid_n_examples", "message": "too few", "param": "training_file"},
    ),
]


@pytest.mark.parametrize(("event", "wire"), EVENTS, ids=lambda value: getattr(value, "type", ""))
def test_every_event_round_trips_through_its_json_line(event: TrainerEvent, wire: dict[str, object]) -> None:
    line = event.to_line()
    assert "\n" not in line
    # The line is exactly json.dumps of the documented object: same keys, order and spacing.
    assert line == json.dumps(wire)
    parsed = parse_event(line)
    assert type(parsed) is type(event) and parsed == event
    assert parse_event(line.encode() + b"\n") == event  # bytes off the pipe, with the newline


def test_every_event_type_is_covered() -> None:
    assert {event.type for event, _ in EVENTS} == {
        "hyperparameters",
        "resumed",
        "metrics",
        "checkpoint",
        "done",
        "paused",
        "error",
    }


def test_absent_validation_metrics_stay_off_the_line() -> None:
    event = parse_event(json.dumps(EVENTS[2][1]))
    assert isinstance(event, MetricsEvent)
    assert event.metrics.valid_loss is None and event.metrics.full_valid_loss is None
    assert "valid_loss" not in json.loads(event.to_line())


def test_new_metrics_are_kept_as_numbers_and_other_extras_are_refused() -> None:
    # A new training method's metrics (DPO's rewards/chosen) pass through without a model change.
    line = json.dumps({**EVENTS[2][1], "rewards/chosen": 1.5, "rewards/margins": 2})
    event = parse_event(line)
    assert isinstance(event, MetricsEvent)
    assert event.metrics.model_extra == {"rewards/chosen": 1.5, "rewards/margins": 2.0}
    assert json.loads(event.to_line())["rewards/chosen"] == 1.5
    with pytest.raises(ValueError, match="metrics"):
        parse_event(json.dumps({**EVENTS[2][1], "note": "not a number"}))
    with pytest.raises(ValueError):  # the other events name every field
        parse_event(json.dumps({**EVENTS[0][1], "extra": 1}))


def test_checkpoint_metrics_are_openai_s_checkpoint_object() -> None:
    event = EVENTS[4][0]
    assert isinstance(event, CheckpointEvent)
    assert event.openai_metrics() == {"step": 6, "train_loss": 0.5, "train_mean_token_accuracy": 0.75}


def test_a_diverged_loss_survives_the_line() -> None:
    diverged = StepMetrics(train_loss=float("nan"), train_mean_token_accuracy=0)
    event = MetricsEvent(step=1, total_steps=2, epoch=1, metrics=diverged)
    assert '"train_loss": NaN' in event.to_line()
    parsed = parse_event(event.to_line())
    assert isinstance(parsed, MetricsEvent) and parsed.metrics.train_loss != parsed.metrics.train_loss


@pytest.mark.parametrize(
    "line",
    [
        "",
        "not json",
        "{not json",
        "[1, 2]",
        '"done"',
        '{"no": "type"}',
        '{"type": "telemetry", "step": 1}',
        '{"type": "metrics", "step": 1}',
        '{"type": "done", "adapter_dir": "/a"}',
        '{"type": "resumed", "step": 1, "epoch": 1, "kind": "crash", "path": "/p"}',
        '{"type": "paused", "step": "five", "total_steps": 12, "checkpoint": null}',
    ],
)
def test_a_line_that_is_not_an_event_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        parse_event(line)


def test_events_read_like_their_json_objects() -> None:
    """Scripts and tests may treat an event like the JSON object it prints as."""
    event, wire = EVENTS[3]
    assert event == wire and event["valid_loss"] == 0.625 and event.get("nope") is None
    assert {"valid_loss", "full_valid_loss"} <= event.keys()
    assert dict(event) == wire
    assert event != {**wire, "step": 8}
    assert event != EVENTS[2][0]
