"""The LoRA trainer: hyperparameter rules, data/labels, memorisation end to end, determinism, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraforge.catalog import load_catalog
from loraforge.contracts.hyperparams import (
    auto_batch_size,
    auto_n_epochs,
    resolve_hyperparameters,
    steps_per_epoch,
)
from loraforge.contracts.train_spec import Hyperparameters, TrainSpec, load_spec
from loraforge.trainer import TrainingDataError, read_chat_jsonl

TINY = "loraforge/tiny-llama"
SYSTEM = "You are a ticket classifier. Reply with JSON only."
ANSWER = '{"label": "refund", "priority": "high", "ok": true}'
SRC = Path(__file__).resolve().parents[2] / "src"


def ticket_examples(n: int) -> list[dict]:
    out = []
    for i in range(n):
        user = (
            f"Ticket {i}: my order has not arrived"
            if i % 2 == 0
            else f"Ticket {i}: please classify this customer message"
        )
        out.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": ANSWER},
                ]
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir with the builtin tiny model built once for this module."""
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path):
    from loraforge.catalog.loading import load_tokenizer

    return load_tokenizer(load_catalog().get(TINY), models_dir)


def make_spec(tmp_path: Path, models_dir: Path, n_examples: int = 20, **overrides) -> TrainSpec:
    fields = {
        "job_id": "ftjob-test",
        "base_model": TINY,
        "models_dir": str(models_dir),
        "training_file": str(write_jsonl(tmp_path / "train.jsonl", ticket_examples(n_examples))),
        "output_dir": str(tmp_path / "adapter"),
        "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1},
        **overrides,
    }
    return TrainSpec.model_validate(fields)


# --------------------------------------------------------------------------- pure: hyperparameters


def test_auto_hyperparameters_follow_openai_rules() -> None:
    entry = load_catalog().get(TINY)  # base lr 5e-3, max_batch_size 4
    assert auto_n_epochs(10) == 10  # 30 < 100 -> min(25, 100 // 10)
    assert auto_n_epochs(20) == 5
    assert auto_n_epochs(3) == 25  # capped at 25
    assert auto_n_epochs(34) == 3  # 102 examples seen: the target
    assert auto_n_epochs(8000) == 3
    assert auto_n_epochs(10_000) == 2  # 30,000 > 25,000 -> 25000 // 10000
    assert auto_n_epochs(100_000) == 1
    assert auto_batch_size(3, 4) == 1
    assert auto_batch_size(12, 4) == 2
    assert auto_batch_size(1000, 4) == 4

    resolved = resolve_hyperparameters(Hyperparameters(), 20, entry)
    assert resolved.model_dump() == {
        "n_epochs": 5,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
        "learning_rate": pytest.approx(5e-3),
    }
    explicit = Hyperparameters(n_epochs=7, batch_size=2, learning_rate_multiplier=0.5)
    resolved = resolve_hyperparameters(explicit, 20, entry)
    assert (resolved.n_epochs, resolved.batch_size) == (7, 2)
    assert resolved.learning_rate == pytest.approx(2.5e-3)
    assert steps_per_epoch(20, 4) == 5
    assert steps_per_epoch(21, 4) == 6


def test_spec_validation_and_round_trip(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tmp_path / "models")
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    assert load_spec(path) == spec
    assert spec.device == "auto" and spec.seed == 42 and spec.log_every == 1
    assert Hyperparameters().n_epochs == "auto"
    with pytest.raises(ValidationError):
        Hyperparameters(n_epochs=0)
    with pytest.raises(ValidationError):
        Hyperparameters(learning_rate_multiplier=-1)
    with pytest.raises(ValidationError):  # unknown keys are refused, not ignored
        make_spec(tmp_path, tmp_path / "models", hyperparameters={"seed": 1})


# --------------------------------------------------------------------------- data and labels


def test_read_chat_jsonl_validation(tmp_path: Path) -> None:
    few = write_jsonl(tmp_path / "few.jsonl", ticket_examples(7))
    with pytest.raises(TrainingDataError) as info:
        read_chat_jsonl(few)
    assert info.value.code == "invalid_n_examples"
    assert info.value.message == "Training file has 7 example(s), but must have at least 10 examples"
    assert info.value.param == "training_file"

    no_assistant = ticket_examples(10)
    no_assistant[3]["messages"].pop()
    with pytest.raises(TrainingDataError, match="line 4") as info:
        read_chat_jsonl(write_jsonl(tmp_path / "na.jsonl", no_assistant))
    assert info.value.code == "invalid_training_file"

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ticket_examples(1)[0]) + "\n{not json\n")
    with pytest.raises(TrainingDataError, match="line 2"):
        read_chat_jsonl(broken, min_examples=1)

    # Blank lines are skipped; text parts are flattened.
    parts = ticket_examples(10)
    parts[0]["messages"][1]["content"] = [
        {"type": "text", "text": "Hello"},
        {"type": "text", "text": "there"},
    ]
    path = tmp_path / "parts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in parts) + "\n\n   \n")
    examples = read_chat_jsonl(path)
    assert len(examples) == 10
    assert examples[0]["messages"][1]["content"] == "Hello\nthere"


def test_weight_zero_turn_gets_no_labels(tmp_path: Path, tokenizer) -> None:
    from loraforge.trainer.data import IGNORE_INDEX, collate, tokenize_example

    record = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Ticket 1: hello"},
            {"role": "assistant", "content": "not this one", "weight": 0},
            {"role": "user", "content": "Ticket 2: my order has not arrived"},
            {"role": "assistant", "content": ANSWER},
        ]
    }
    examples = read_chat_jsonl(write_jsonl(tmp_path / "w.jsonl", [record] * 10))
    ex = tokenize_example(tokenizer, examples[0])
    assert len(ex.input_ids) == len(ex.labels)
    labelled = [tok for tok in ex.labels if tok != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == ANSWER + "<|eot_id|>"
    # Labels are the input ids themselves on the trained span.
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ex.input_ids, ex.labels, strict=True))

    record["messages"][2].pop("weight")
    both = tokenize_example(tokenizer, read_chat_jsonl(write_jsonl(tmp_path / "b.jsonl", [record] * 10))[0])
    decoded = tokenizer.decode([tok for tok in both.labels if tok != IGNORE_INDEX])
    assert decoded == "not this one<|eot_id|>" + ANSWER + "<|eot_id|>"

    short = tokenize_example(tokenizer, examples[0], max_seq_length=12)
    assert short.input_ids == ex.input_ids[:12]

    batch = collate([ex, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.input_ids))
    assert batch["attention_mask"][1].tolist() == [1] * 12 + [0] * (len(ex.input_ids) - 12)
    assert set(batch["input_ids"][1, 12:].tolist()) == {tokenizer.pad_token_id}
    assert set(batch["labels"][1, 12:].tolist()) == {IGNORE_INDEX}


# --------------------------------------------------------------------------- training


@pytest.mark.slow  # trains the tiny model to the end
def test_memorisation_end_to_end(tmp_path: Path, models_dir: Path, tokenizer) -> None:
    import torch
    from peft import PeftModel

    from loraforge.adapters.format import REQUIRED_FILES, validate_adapter_dir
    from loraforge.catalog.loading import load_model
    from loraforge.trainer import train

    spec = make_spec(
        tmp_path,
        models_dir,
        hyperparameters={"n_epochs": 20, "batch_size": 4, "learning_rate_multiplier": 1},
    )
    events: list[dict] = []
    manifest = train(spec, events.append)

    preparing = [e for e in events if e["type"] == "data_progress"]
    ready, hp = preparing[-1], events[len(preparing)]  # the data first, then the hyperparameters
    assert ready["fraction"] == 1.0 and ready["n_examples"] == 20 and not ready["cached"]
    assert hp["type"] == "hyperparameters"
    assert (hp["n_epochs"], hp["batch_size"], hp["total_steps"], hp["n_examples"]) == (20, 4, 100, 20)
    assert hp["learning_rate"] == pytest.approx(5e-3)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 101))
    assert metrics[-1]["epoch"] == 20 and metrics[-1]["total_steps"] == 100
    assert metrics[-1]["train_loss"] < 0.01
    assert metrics[-1]["train_mean_token_accuracy"] == 1.0
    done = events[-1]
    assert done["type"] == "done" and done["total_steps"] == 100
    assert done["trained_tokens"] == hp["train_tokens_per_epoch"] * 20

    adapter_dir = Path(done["adapter_dir"])
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(REQUIRED_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no temp leftovers
    stored = validate_adapter_dir(adapter_dir)
    assert stored == manifest
    assert stored.base_model == TINY and stored.base_weights == "builtin:tiny-llama"
    assert stored.stop_tokens == ["<|eot_id|>", "<|end_of_text|>"]
    assert stored.lora.r == 16 and stored.hyperparameters["n_epochs"] == 20
    assert stored.metrics["train_loss"] == done["train_loss"]
    assert len(stored.spec_hash) == 64

    entry = load_catalog().get(TINY)
    prompt = ticket_examples(1)[0]["messages"][:2]
    enc = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def generate(model) -> str:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=eot)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    base = load_model(entry, models_dir).eval()
    assert generate(base) != ANSWER
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert generate(tuned) == ANSWER


@pytest.mark.slow  # trains the tiny model to the end
def test_same_spec_same_losses_and_retry_replaces_adapter(tmp_path: Path, models_dir: Path) -> None:
    from loraforge.adapters.format import read_manifest
    from loraforge.trainer import train

    spec = make_spec(tmp_path, models_dir, n_examples=12, log_every=2)
    runs = []
    for _ in range(2):
        events: list[dict] = []
        manifest = train(spec, events.append)
        runs.append(([e["train_loss"] for e in events if e["type"] == "metrics"], manifest))
    (losses_a, manifest_a), (losses_b, manifest_b) = runs
    # 12 examples, batch 4, 3 epochs: 9 steps, logged at 2, 4, 6, 8 and the last.
    assert len(losses_a) == 5
    assert losses_a == losses_b
    assert manifest_a.spec_hash == manifest_b.spec_hash
    assert read_manifest(Path(spec.output_dir)).created_at == manifest_b.created_at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "train.jsonl"]


def test_validation_metrics_at_epoch_end(tmp_path: Path, models_dir: Path) -> None:
    from loraforge.trainer import train

    valid = write_jsonl(tmp_path / "valid.jsonl", ticket_examples(3))
    spec = make_spec(
        tmp_path,
        models_dir,
        n_examples=10,
        validation_file=str(valid),
        log_every=100,
        hyperparameters={"n_epochs": 2, "batch_size": 5},
    )
    events: list[dict] = []
    manifest = train(spec, events.append)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [(m["step"], m["epoch"]) for m in metrics] == [(2, 1), (4, 2)]
    assert all({"valid_loss", "valid_mean_token_accuracy"} <= m.keys() for m in metrics)
    assert manifest.metrics["valid_loss"] == metrics[-1]["valid_loss"]


# --------------------------------------------------------------------------- CLI


def run_cli(spec: TrainSpec, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge.trainer", str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    return proc, lines


@pytest.mark.slow  # a trainer subprocess (imports torch)
def test_cli_prints_json_lines_and_writes_adapter(tmp_path: Path, models_dir: Path) -> None:
    spec = make_spec(tmp_path, models_dir, n_examples=10, hyperparameters={"n_epochs": 1, "batch_size": 5})
    proc, lines = run_cli(spec, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # A 10-line file is ready within a second: one data_progress line (ready), no percentages.
    assert [line["type"] for line in lines] == [
        "data_progress",
        "hyperparameters",
        "metrics",
        "metrics",
        "done",
    ]
    assert lines[0]["fraction"] == 1.0 and lines[0]["n_examples"] == 10
    assert lines[-1]["adapter_dir"] == str((tmp_path / "adapter").resolve())
    assert (tmp_path / "adapter" / "manifest.json").is_file()


def test_cli_too_few_examples_exits_2(tmp_path: Path, models_dir: Path) -> None:
    spec = make_spec(tmp_path, models_dir, n_examples=5)
    proc, lines = run_cli(spec, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        {
            "type": "error",
            "code": "invalid_n_examples",
            "message": "Training file has 5 example(s), but must have at least 10 examples",
            "param": "training_file",
        }
    ]
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow  # a trainer subprocess (imports torch)
def test_cli_other_failure_exits_1(tmp_path: Path, models_dir: Path) -> None:
    spec = make_spec(tmp_path, models_dir, n_examples=10, base_model="no/such-model")
    proc, lines = run_cli(spec, tmp_path)
    assert proc.returncode == 1
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "training_error"
    assert "no/such-model" in lines[-1]["message"] and lines[-1]["param"] is None


def test_pure_trainer_modules_do_not_import_torch() -> None:
    # The worker and API import the spec/data/hyperparams; only ``train`` may pull in torch.
    # (tests/unit/test_import_boundaries.py checks that the recipe imports no service code.)
    code = (
        "import sys\n"
        "import loraforge.trainer, loraforge.contracts.train_spec, loraforge.trainer.data\n"
        "import loraforge.contracts.hyperparams, loraforge.contracts.trainer_events\n"
        "import loraforge.contracts.trainer_launch\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
