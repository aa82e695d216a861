"""The trainer's data pipeline (``trainer/dataset.py``): the same examples as transformers'
``apply_chat_template``, a cache a second run reuses, the same errors as reading the file whole, and
one definition of a valid example and of its tokens shared with the pre-flight (every line of the
malformed corpus, and a generated file)."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loraforge.catalog import load_catalog
from loraforge.preflight import validate_for_model
from loraforge.preflight.report import FileReport
from loraforge.preflight.run import make_counter
from loraforge.preflight.validate import parse_line
from loraforge.trainer.data import (
    IGNORE_INDEX,
    TrainingDataError,
    _validate_example,
    read_chat_jsonl,
    tokenize_batch,
    tokenize_dataset,
)
from loraforge.trainer.dataset import prepare
from tests.helpers import chat_examples, to_jsonl
from tests.preflight_corpus import cases

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from data_pipeline import generate  # noqa: E402

TINY = "loraforge/tiny-llama"
# Pre-flight verdicts on a line that are about its token count under a job's limit, not about
# whether it is a valid example: the trainer cuts such an example and trains on what is left.
TOKEN_VERDICTS = {"example_too_long"}


@pytest.fixture(scope="module")
def entry():  # type: ignore[no-untyped-def]
    return load_catalog().get(TINY)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def hf_tokenizer(entry, models_dir: Path):  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_tokenizer, resolve_weights

    resolve_weights(entry, models_dir)
    return load_tokenizer(entry, models_dir)


def _varied() -> list[dict[str, Any]]:
    """Plain chats, a weight-0 turn, text parts, and a tool-calling round trip."""
    records = chat_examples(6)
    weighted = json.loads(json.dumps(records[0]))
    weighted["messages"][-1]["weight"] = 0
    weighted["messages"] += [
        {"role": "user", "content": "and again?"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Once"}, {"type": "text", "text": "more"}],
        },
    ]
    tool = {
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "assistant", "content": "It is 18C in Paris."},
        ],
    }
    return [*records, weighted, tool, tool, weighted]


def _reference(tokenizer: Any, record: dict[str, Any], limit: int | None) -> tuple[list[int], list[int]]:
    """What main's trainer computed: transformers' assistant mask, weight-0 runs cleared."""
    chat = [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]
    enc = tokenizer.apply_chat_template(
        chat, tools=record["tools"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    runs, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    weights = [m.get("weight", 1) for m in record["messages"] if m["role"] == "assistant"]
    for (a, b), w in zip(runs, weights, strict=True):
        if not w:
            mask[a:b] = [0] * (b - a)
    labels = [t if bit else IGNORE_INDEX for t, bit in zip(ids, mask, strict=True)]
    return ids[:limit], labels[:limit]


def test_prepared_rows_equal_apply_chat_template_and_are_cached(tmp_path: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "train.jsonl"
    path.write_bytes(to_jsonl(_varied()) + b"\n\n")  # blank lines are skipped
    records = read_chat_jsonl(path)
    events: list[tuple[float, float, float]] = []
    first = prepare(path, hf_tokenizer, 200, tmp_path / "data", progress=lambda *a: events.append(a))
    assert not first.cached and len(first.examples) == len(records) == 10
    assert events and events[-1][0] == 1.0 and all(0 < f <= 1 for f, _, _ in events)
    for row, record in zip(first.examples, records, strict=True):
        assert (row.input_ids, row.labels) == _reference(hf_tokenizer, record, 200)
    assert [r.input_ids for r in first.examples] == [
        r.input_ids for r in tokenize_dataset(hf_tokenizer, records, 200)
    ]
    assert first.examples.lengths() == [len(r.input_ids) for r in first.examples]
    assert first.examples.n_label_tokens() == sum(r.n_label_tokens for r in first.examples) > 0
    assert [r.labels for r in first.examples.take([9, 0])] == [
        first.examples[9].labels,
        first.examples[0].labels,
    ]

    again = prepare(path, hf_tokenizer, 200, tmp_path / "data")
    assert again.cached and again.path == first.path
    assert [r.labels for r in again.examples] == [r.labels for r in first.examples]
    # Another cut (the end of long examples lost), or another file content, is another directory.
    longer = prepare(path, hf_tokenizer, 40, tmp_path / "data")
    assert not longer.cached and longer.path != first.path
    path.write_bytes(to_jsonl(_varied()[::-1]))
    assert prepare(path, hf_tokenizer, 200, tmp_path / "data").path not in (first.path, longer.path)


def test_errors_name_the_same_line_as_reading_the_file_whole(tmp_path: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    lines = [json.dumps(r) for r in chat_examples(12)]
    lines[6] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    lines[9] = "{not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingDataError) as whole:
        read_chat_jsonl(path)
    with pytest.raises(TrainingDataError) as prepared:
        prepare(path, hf_tokenizer, 64, tmp_path / "data")
    assert (prepared.value.code, prepared.value.message) == (whole.value.code, whole.value.message)
    assert "line 7" in prepared.value.message
    few = tmp_path / "few.jsonl"
    few.write_bytes(to_jsonl(chat_examples(3)))
    with pytest.raises(TrainingDataError) as too_few:
        prepare(few, hf_tokenizer, 64, tmp_path / "data")
    assert too_few.value.code == "invalid_n_examples"
    assert not list((tmp_path / "data").glob("*/prepared.json"))  # nothing half-made is kept


def _trainer_verdict(tokenizer: Any, raw: bytes, limit: int) -> tuple[bool, Any]:
    """What ``trainer/dataset.py`` does with one line (``_tokenize_rows``), kept apart to compare."""
    obj, issue = parse_line(raw)
    if issue is not None:
        return False, None
    try:
        record = _validate_example(obj)
        return True, (
            record,
            tokenize_batch(tokenizer, [record], None)[0],
            tokenize_batch(tokenizer, [record], limit)[0],
        )
    except ValueError:  # json errors, invalid examples, templates that refuse them
        return False, None


def test_preflight_and_trainer_agree_on_every_corpus_line(entry, models_dir: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    counter = make_counter(entry, models_dir, FileReport())
    assert counter is not None and counter.fast is not None  # the pre-flight's own fast path
    limit = counter.max_seq_length
    checked = valid = 0
    for case in cases():
        if case.method != "supervised":
            continue
        report = validate_for_model(io.BytesIO(case.data), entry, models_dir, file_id="file-x")
        if report.format != "chat":  # a preference or legacy file: refused whole, as the trainer does
            continue
        refused = {i.line for i in report.errors.items if i.line is not None and i.code not in TOKEN_VERDICTS}
        for lineno, raw in enumerate(case.data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            ok, got = _trainer_verdict(hf_tokenizer, raw, limit)
            assert ok == (lineno not in refused), (case.name, lineno, report.details())
            checked += 1
            if ok:
                record, full, cut = got
                ours = counter.count(record["messages"], record["tools"])
                assert ours is not None
                assert (ours.length, ours.total, ours.trained) == (
                    len(full.input_ids),
                    len(cut.input_ids),
                    cut.n_label_tokens,
                ), (case.name, lineno)
                valid += 1
    assert checked > 500 and valid > 400


@pytest.mark.slow
def test_preflight_and_trainer_agree_on_a_generated_file(
    tmp_path: Path, entry, models_dir: Path, hf_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gen.jsonl"
    n = generate(path, 2, seed=7)  # ~1,000 chats, ~1 M tokens
    with path.open("rb") as fh:
        report = validate_for_model(fh, entry, models_dir, file_id="file-x")
    assert report.ok and report.tokens is not None and report.n_examples == n
    started = time.monotonic()
    prepared = prepare(path, hf_tokenizer, report.tokens.max_seq_length, tmp_path / "data")
    assert time.monotonic() - started < 60
    assert len(prepared.examples) == n
    assert sum(prepared.examples.lengths()) == report.tokens.total_tokens
    assert prepared.examples.n_label_tokens() == report.tokens.trained_tokens
    assert max(prepared.examples.lengths()) == min(
        report.tokens.longest_example_tokens, report.tokens.max_seq_length
    )
