"""The seed's fine-tune flow with the unmodified openai SDK against a live loraforge:
upload -> create job -> succeeded -> chat with the fine-tuned model (plain and streaming)."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import openai
import pytest
from openai import OpenAI

from tests.helpers import ANSWER, chat_examples, to_jsonl, training_prompt
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"


def client_for(stack: Stack, org: str) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=stack.key(org), max_retries=0, timeout=120)


@dataclass
class Trained:
    client: OpenAI
    file_id: str
    job_id: str
    model: str
    seconds: float


@pytest.fixture(scope="session")
def trained(stack: Stack) -> Trained:
    """One job trained end to end through the SDK (shared by the tests below)."""
    client = client_for(stack, "acme")
    uploaded = client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(20)))), purpose="fine-tune"
    )
    start = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=uploaded.id, suffix="tickets", hyperparameters={"n_epochs": 20}
    )
    assert job.status == "validating_files"
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() - start > 180:
            pytest.fail(f"job still {job.status} after 180 s\n{stack.log_tail()}")
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    elapsed = time.monotonic() - start
    assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
    return Trained(client, uploaded.id, job.id, job.fine_tuned_model, elapsed)


def test_job_succeeds_fast_with_resolved_fields(trained: Trained) -> None:
    assert trained.seconds < 90, f"took {trained.seconds:.1f}s"
    job = trained.client.fine_tuning.jobs.retrieve(trained.job_id)
    assert job.object == "fine_tuning.job"
    assert job.model == TINY
    assert job.fine_tuned_model == trained.model
    assert trained.model.startswith(f"ft:{TINY}:acme:tickets:") and len(trained.model.rsplit(":", 1)[1]) == 8
    # "auto" replaced by the values the trainer resolved.
    assert job.hyperparameters.n_epochs == 20
    assert job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.supervised.hyperparameters.batch_size == 4
    assert isinstance(job.finished_at, int) and job.finished_at >= job.created_at
    assert isinstance(job.trained_tokens, int) and job.trained_tokens > 0
    assert job.error is None and len(job.result_files) == 1 and isinstance(job.seed, int)
    assert job.organization_id.startswith("org-")


def test_fine_tuned_model_answers_with_the_trained_text(trained: Trained) -> None:
    client = trained.client
    reply = client.chat.completions.create(
        model=trained.model, messages=training_prompt(3), temperature=0, max_tokens=40
    )
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0

    base = client.chat.completions.create(
        model=TINY, messages=training_prompt(3), temperature=0, max_tokens=40
    )
    assert base.choices[0].message.content != ANSWER

    stream = client.chat.completions.create(
        model=trained.model,
        messages=training_prompt(3),
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_events_show_lifecycle_and_metrics(trained: Trained) -> None:
    events = list(trained.client.fine_tuning.jobs.list_events(trained.job_id, limit=7))
    messages = [e.message for e in reversed(events)]  # oldest first
    expected = [
        f"Created fine-tuning job: {trained.job_id}",
        "Validating training file:",
        "Files validated, moving job to queued state",
        "Fine-tuning job started",
        f"New fine-tuned model created: {trained.model}",
        "The job has successfully completed",
    ]
    positions = [next(i for i, m in enumerate(messages) if m.startswith(text)) for text in expected]
    assert positions == sorted(positions)
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics, "no metrics events"
    last = max(metrics, key=lambda e: e.data["step"])
    assert last.data["step"] == last.data["total_steps"] == 100
    assert last.data["train_loss"] < 0.05
    assert 0.0 <= last.data["train_mean_token_accuracy"] <= 1.0


def test_auto_pagination_terminates(stack: Stack, trained: Trained) -> None:
    client = trained.client
    for i in range(2):
        client.files.create(
            file=(f"extra{i}.jsonl", io.BytesIO(to_jsonl(chat_examples(10)))), purpose="fine-tune"
        )
    ids = [f.id for f in client.files.list(limit=1)]
    assert len(ids) == len(set(ids)) >= 3 and trained.file_id in ids
    job_ids = [j.id for j in client.fine_tuning.jobs.list(limit=1)]
    assert trained.job_id in job_ids and len(job_ids) == len(set(job_ids))
    assert [f.id for f in client.files.list(order="asc")] == list(reversed(ids))


def test_models_list_shows_base_and_fine_tuned(trained: Trained) -> None:
    ids = [m.id for m in trained.client.models.list()]
    assert TINY in ids and trained.model in ids
    assert trained.client.models.retrieve(trained.model).id == trained.model
    assert trained.client.models.retrieve(TINY).owned_by == "loraforge"


def test_other_org_sees_nothing(stack: Stack, trained: Trained) -> None:
    other = client_for(stack, "globex")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(trained.file_id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(trained.file_id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(trained.job_id)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.list_events(trained.job_id)
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(trained.model)
    with pytest.raises(openai.NotFoundError):
        other.models.delete(trained.model)
    with pytest.raises(openai.NotFoundError) as exc:
        other.chat.completions.create(model=trained.model, messages=training_prompt(3))
    assert exc.value.code == "model_not_found"
    assert trained.model not in [m.id for m in other.models.list()]
    assert trained.job_id not in [j.id for j in other.fine_tuning.jobs.list()]


def test_bad_input_gets_the_envelope(stack: Stack, trained: Trained) -> None:
    client = trained.client
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=stack.base_url, api_key="sk-nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model=TINY, training_file="file-doesnotexist")
    assert exc.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("notes.jsonl", io.BytesIO(b"hello world\nnot json\n")), purpose="fine-tune")
    assert "Line 1" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:
        client.fine_tuning.jobs.create(model="no-such/model", training_file=trained.file_id)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(
            model=TINY, training_file=trained.file_id, hyperparameters={"n_epochs": 0}
        )
    assert exc.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as exc:
        client.post("/fine_tuning/jobs", body={"model": TINY}, cast_to=object)
    assert exc.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=[])
    assert exc.value.param == "messages"


def test_too_few_examples_fails_the_job(trained: Trained) -> None:
    client = trained.client
    small = client.files.create(
        file=("small.jsonl", io.BytesIO(to_jsonl(chat_examples(7)))), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(model=TINY, training_file=small.id)
    deadline = time.monotonic() + 60
    while job.status not in ("failed", "succeeded") and time.monotonic() < deadline:
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "failed"
    assert job.error.code == "invalid_n_examples" and job.error.param == "training_file"
    assert "7 example(s)" in job.error.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already failed" in exc.value.message
