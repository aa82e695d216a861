"""The pre-flight validator and token counter, in process: every corpus defect named with its code,
line and path; token counts equal to ``apply_chat_template`` (transformers) on tiny-llama; flat
memory; the error cap."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraforge.catalog import load_catalog
from loraforge.contracts.hyperparams import auto_batch_size, auto_n_epochs
from loraforge.preflight import check_job, job_error, validate_file, validate_for_model
from loraforge.preflight.report import MAX_ISSUES, FileReport
from loraforge.preflight.run import make_counter
from tests.helpers import chat_examples, to_jsonl
from tests.preflight_corpus import Case, cases, find_issue

TINY = "loraforge/tiny-llama"
CASES = cases()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def entry():  # type: ignore[no-untyped-def]
    return load_catalog().get(TINY)


def test_corpus_is_big_enough() -> None:
    assert len({c.name for c in CASES}) >= 40
    assert len([c for c in CASES if c.stage != "warning"]) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_defect_is_named_with_code_line_and_path(case: Case, entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    structure = validate_file(io.BytesIO(case.data))
    report = validate_for_model(
        io.BytesIO(case.data), entry, models_dir, method=case.method, file_id="file-x"
    )
    if case.stage in ("upload", "file"):
        assert find_issue([i.to_dict() for i in structure.errors.items], case), structure.details()
    else:
        assert structure.ok, structure.details()  # a file the upload check lets through
    error = job_error(report, "training_file", case.method)
    if case.stage == "warning":
        assert find_issue([i.to_dict() for i in report.warnings.items], case), report.to_dict()
        assert error is None
        return
    if case.code:
        issue = find_issue([i.to_dict() for i in report.errors.items], case)
        assert issue is not None, report.details()
        expected = f"line {case.line}: " if case.line is not None else ""
        assert str(next(i for i in report.errors.items if i.code == case.code)).startswith(expected)
    if not case.job_code:
        assert error is None and not report.errors.total, report.details()
        return
    assert error is not None and error["code"] == case.job_code and error["param"] == case.job_param


def test_message_reads_like_the_issue(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    bad = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "x", "content": "b"},
                {"role": "bot", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        }
    )
    lines = to_jsonl(chat_examples(16)).splitlines()
    lines[16 - 1] = bad.encode()
    report = validate_file(io.BytesIO(b"\n".join(lines) + b"\n"))
    assert [str(i) for i in report.errors.items] == [
        "line 16: messages[1].role 'x' is not one of system, developer, user, assistant, tool",
        "line 16: messages[2].role 'bot' is not one of system, developer, user, assistant, tool",
    ]


def test_every_error_up_to_the_cap_and_the_total() -> None:
    lines = [b"not json"] * 250 + to_jsonl(chat_examples(10)).splitlines()
    report = validate_file(io.BytesIO(b"\n".join(lines)))
    assert report.errors.total == 250 and len(report.errors.items) == MAX_ISSUES
    assert [i.line for i in report.errors.items] == list(range(1, MAX_ISSUES + 1))
    assert report.n_examples == 10 and "250 error(s)" in report.summary()


# --- token accounting agrees with transformers' apply_chat_template (the trainer's tokenizer) ---

_WORDS = "hello world ünïcödé 😀 東京 refund {json} <|eot_id|> \t  tabs  spaces\n newline ok? it's".split(" ")


def _random_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs: list[dict] = []
        if rng.random() < 0.5:
            msgs.append(
                {
                    "role": rng.choice(["system", "developer"]),
                    "content": " ".join(rng.choices(_WORDS, k=rng.randint(0, 12))),
                }
            )
        for _turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(_WORDS, k=rng.randint(1, 40)))})
            answer: dict = {
                "role": "assistant",
                "content": " ".join(rng.choices(_WORDS, k=rng.randint(0, 160))),
            }
            if rng.random() < 0.25:
                answer["content"] = [
                    {"type": "text", "text": "part one 😀 "},
                    {"type": "text", "text": " two"},
                ]
            if rng.random() < 0.3:
                answer["weight"] = rng.choice([0, 1])
            msgs.append(answer)
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(entry, models_dir: Path):  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_tokenizer

    return load_tokenizer(entry, models_dir)  # builds tiny-llama with transformers (tests may)


@pytest.mark.parametrize("fast", [True, False], ids=["pretoken-cache", "full-tokenizer"])
def test_token_counts_equal_apply_chat_template(fast: bool, entry, models_dir: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from loraforge.trainer.data import _validate_messages, tokenize_example

    report = FileReport()
    counter = make_counter(entry, models_dir, report)
    assert counter is not None and (counter.fast is not None)
    if not fast:
        counter.fast = None
    limit = counter.max_seq_length
    total = trained = longest = 0
    for example in _random_examples(300):
        messages = _validate_messages(example)
        ours = counter.count(messages)
        cut = tokenize_example(hf_tokenizer, messages, limit)
        full = tokenize_example(hf_tokenizer, messages, None)
        assert ours is not None
        assert (ours.length, ours.total, ours.trained) == (
            len(full.input_ids),
            len(cut.input_ids),
            cut.n_label_tokens,
        )
        total, trained, longest = (
            total + len(cut.input_ids),
            trained + cut.n_label_tokens,
            max(longest, len(full.input_ids)),
        )
    assert counter.fast is (counter.fast if fast else None)  # the fast path never fell back
    # And the streaming report over the same file gives the same totals.
    file_report = validate_for_model(io.BytesIO(to_jsonl(_random_examples(300))), entry, models_dir)
    assert file_report.tokens is not None
    tokens = file_report.tokens
    assert (tokens.total_tokens, tokens.trained_tokens, tokens.longest_example_tokens) == (
        total,
        trained,
        longest,
    )


def test_fast_path_falls_back_when_it_disagrees(
    entry, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    data = to_jsonl(chat_examples(40))
    honest = validate_for_model(io.BytesIO(data), entry, models_dir).tokens
    report = FileReport()
    counter = make_counter(entry, models_dir, report)
    assert counter is not None and counter.fast is not None
    real = counter.fast.measure
    monkeypatch.setattr(
        counter.fast, "measure", lambda text, spans: (real(text, spans)[0] + 1, real(text, spans)[1])
    )
    from loraforge.preflight.validate import validate_lines

    validate_lines(io.BytesIO(data), counter=counter, report=report)
    assert counter.fast is None and report.tokens == honest


def test_estimate_matches_the_trainers_rules(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = to_jsonl(chat_examples(23))
    check = check_job(
        entry,
        models_dir,
        method="supervised",
        hyperparameters={"n_epochs": "auto"},
        training=lambda: iter(io.BytesIO(data)),
    )
    assert check.error is None and check.estimate is not None
    est = check.estimate
    assert est["n_epochs"] == auto_n_epochs(23) and est["batch_size"] == auto_batch_size(
        23, entry.max_batch_size
    )
    assert (
        est["steps_per_epoch"] == -(-23 // est["batch_size"])
        and est["total_steps"] == est["steps_per_epoch"] * est["n_epochs"]
    )
    assert est["estimated_trained_tokens"] == check.training.tokens.trained_tokens * est["n_epochs"]
    assert est["estimated_duration_seconds"] > 0 and est["throughput_source"] == "default"


def test_job_max_seq_length_cuts_examples(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = to_jsonl(chat_examples(12))
    check = check_job(
        entry,
        models_dir,
        method="supervised",
        hyperparameters={"max_seq_length": 40},
        training=lambda: iter(io.BytesIO(data)),
    )
    tokens = check.training.tokens
    assert tokens is not None and tokens.max_seq_length == 40 and tokens.truncated_examples == 12
    assert tokens.total_tokens == 12 * 40


# --- streaming, constant memory ---


def _big_file(n_lines: int) -> Iterator[bytes]:
    text = "please classify this customer message about a late delivery and a refund " * 20
    for i in range(n_lines):
        yield (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Ticket {i}: {text}"},
                        {"role": "assistant", "content": text},
                    ]
                }
            )
            + "\n"
        ).encode()


@pytest.mark.slow  # a large generated file
def test_memory_stays_flat_whatever_the_file_size(entry, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    validate_for_model(_big_file(300), entry, models_dir)  # warm the caches
    peaks = []
    for n in (300, 1200):
        tracemalloc.start()
        report = validate_for_model(_big_file(n), entry, models_dir)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert report.ok and report.n_examples == n
    # 4x the lines (~0.9 MB -> ~3.6 MB of JSONL) and the peak does not grow with them.
    assert peaks[1] < 3 * 1024 * 1024 and peaks[1] < peaks[0] * 1.5, peaks


# --- the tiny tokenizer without torch, identical to the full build's ---


def test_tiny_tokenizer_without_torch_is_the_full_builds(
    tmp_path: Path, entry, models_dir: Path, hf_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from loraforge.catalog import load_catalog\n"
        "from loraforge.preflight.tokenizer_source import locate_tokenizer\n"
        f"src = locate_tokenizer(load_catalog().get({TINY!r}), Path({str(tmp_path)!r}))\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))\n"
        "print(json.dumps([str(src.tokenizer_json), heavy]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    path, heavy = json.loads(out.stdout)
    assert heavy == []
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(path)
    built = Tokenizer.from_file(str(models_dir / "tiny-llama" / "tokenizer.json"))
    assert raw.to_str() == built.to_str()


@pytest.mark.slow  # worker processes over a large file
def test_parallel_check_of_a_large_file_equals_one_process(  # type: ignore[no-untyped-def]
    entry, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraforge.preflight.run as run

    lines = to_jsonl(_random_examples(1500, seed=3)).splitlines()
    bad_role = json.dumps(
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    )
    tools = json.dumps(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        }
    )
    for where, line in ((4, bad_role), (700, b""), (750, tools), (1200, bad_role), (1490, tools)):
        lines[where] = line if isinstance(line, bytes) else line.encode()
    lines[900] = json.dumps(_random_examples(1)[0] | {"input": {}}).encode()  # still chat: "messages" wins
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    single = validate_for_model(io.BytesIO(path.read_bytes()), entry, models_dir)
    monkeypatch.setattr(run, "workers_for", lambda size: 3)
    seen: list[int] = []
    split = validate_for_model(iter(()), entry, models_dir, path=path, progress=seen.append)
    assert split.to_dict() == single.to_dict()
    flagged = {(i.line, i.code) for i in split.errors.items}
    assert {(5, "unknown_role"), (701, "blank_line"), (1201, "unknown_role")} <= flagged
    assert split.warnings.total == single.warnings.total  # the tools warning once, not once per range
    assert seen and seen[-1] == path.stat().st_size
