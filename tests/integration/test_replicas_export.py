"""Two built-in engine processes as replicas of one base model, behind a live API and worker
(``LORAFORGE_ENGINES``): a finished job's adapter is on both, they answer alike, the API spreads
requests over them and re-loads a replica that lost the adapter, export works (PEFT and merged,
owner only), the trial plan's limit holds, and deleting the model unloads it everywhere."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.helpers import ANSWER, chat_examples, to_jsonl, training_prompt
from tests.integration.conftest import Stack, free_port, stop_stack

pytestmark = pytest.mark.integration

TINY = "loraforge/tiny-llama"
ORG = "replica-trial-org"  # trial plan: one hosted model
ENGINE_KEY = "replica-engine-key"


@dataclass
class Replicas:
    stack: Stack
    urls: list[str]
    extra: subprocess.Popen[bytes]
    client: OpenAI
    model: str
    job_id: str
    file_id: str


def _wait(urls: list[str], procs: list[subprocess.Popen[bytes]], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail("a process exited early:\n" + log.read_text(errors="replace")[-4000:])
        try:
            if all(httpx.get(f"{u}/health", timeout=2).status_code == 200 for u in urls):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("not healthy:\n" + log.read_text(errors="replace")[-4000:])


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """``loraforge serve`` (API + worker + engine 1) plus a second ``loraforge engine`` process."""
    home = tmp_path_factory.mktemp("home-replicas")
    api_port, port1, port2 = free_port(), free_port(), free_port()
    urls = [f"http://127.0.0.1:{port1}", f"http://127.0.0.1:{port2}"]
    env = {
        **os.environ,
        "LORAFORGE_HOME": str(home),
        "LORAFORGE_API_PORT": str(api_port),
        "LORAFORGE_ENGINE_PORT": str(port1),
        "LORAFORGE_ENGINES": json.dumps({TINY: urls}),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Both engines require it (serve would otherwise make one only its own children know).
        "LORAFORGE_ENGINE_API_KEY": ENGINE_KEY,
    }
    log_path = home / "serve.log"
    stack = Stack("embedded", home, env, f"http://127.0.0.1:{api_port}", urls[0], log_path)
    with log_path.open("wb") as log:
        stack.proc = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "serve"], env=env, stdout=log, stderr=log
        )
    extra_log = home / "engine2.log"
    extra: subprocess.Popen[bytes] | None = None
    try:
        _wait([stack.api_url, urls[0]], [stack.proc], log_path)  # engine 1 has built the tiny model
        with extra_log.open("wb") as log:
            extra = subprocess.Popen(
                [sys.executable, "-m", "loraforge", "engine", "--port", str(port2)],
                env=env,
                stdout=log,
                stderr=log,
            )
        _wait([urls[1]], [extra], extra_log)
        client = OpenAI(
            base_url=stack.base_url, api_key=stack.key(ORG, tier="trial"), max_retries=0, timeout=120
        )
        # The subject is the trial plan's hosted-model limit; polling the job outruns its 30 rpm.
        stack.cli("orgs", "set", ORG, "--rpm", "unlimited")
        uploaded = client.files.create(
            file=("train.jsonl", io.BytesIO(to_jsonl(chat_examples(20)))), purpose="fine-tune"
        )
        job = client.fine_tuning.jobs.create(
            model=TINY,
            training_file=uploaded.id,
            suffix="replicas",
            hyperparameters={"n_epochs": 20, "lora_r": 16, "warmup_ratio": 0.05},
        )
        deadline = time.monotonic() + 240
        while job.status not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                pytest.fail(f"job still {job.status}\n{stack.log_tail()}")
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", f"{job.error}\n{stack.log_tail()}"
        yield Replicas(stack, urls, extra, client, job.fine_tuned_model or "", job.id, uploaded.id)
    finally:
        if extra is not None and extra.poll() is None:
            extra.terminate()
            extra.wait(30)
        stop_stack(stack)


def _engine_sdk(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=ENGINE_KEY, max_retries=0, timeout=60)


def test_both_replicas_hold_the_adapter_and_answer_alike(replicas: Replicas) -> None:
    for url in replicas.urls:  # loaded by the worker into every replica when the job succeeded
        assert replicas.model in _health(url)["adapters"]
    answers = [
        _engine_sdk(url).chat.completions.create(
            model=replicas.model, messages=training_prompt(3), temperature=0, max_tokens=40
        )
        for url in replicas.urls
    ]
    assert [a.choices[0].message.content for a in answers] == [ANSWER, ANSWER]
    assert answers[0].usage.completion_tokens == answers[1].usage.completion_tokens  # type: ignore[union-attr]
    hp = replicas.client.fine_tuning.jobs.retrieve(replicas.job_id).hyperparameters.model_dump()
    assert hp["lora_r"] == 16 and hp["warmup_ratio"] == 0.05 and hp["n_epochs"] == 20


def test_api_spreads_requests_and_reloads_a_replica_that_lost_the_adapter(replicas: Replicas) -> None:
    # Replica 2 "restarts" without the adapter; the API's hot-load on 404 must bring it back.
    assert httpx.post(
        f"{replicas.urls[1]}/v1/unload_lora_adapter",
        json={"lora_name": replicas.model},
        headers={"Authorization": f"Bearer {ENGINE_KEY}"},
        timeout=30,
    ).is_success
    before = [_health(u)["stats"]["requests"] for u in replicas.urls]
    for _ in range(4):
        reply = replicas.client.chat.completions.create(
            model=replicas.model, messages=training_prompt(3), temperature=0, max_tokens=40
        )
        assert reply.choices[0].message.content == ANSWER
    after = [_health(u)["stats"]["requests"] for u in replicas.urls]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # both served
    assert replicas.model in _health(replicas.urls[1])["adapters"]


def test_unservable_lora_is_refused_at_creation(replicas: Replicas) -> None:
    file_id = replicas.file_id
    with pytest.raises(openai.BadRequestError) as exc:
        replicas.client.fine_tuning.jobs.create(
            model=TINY, training_file=file_id, hyperparameters={"lora_r": 128}
        )
    assert exc.value.param == "hyperparameters.lora_r" and exc.value.code == "lora_config_not_servable"


def _export(replicas: Replicas, fmt: str, key: str | None = None) -> httpx.Response:
    key = key or replicas.client.api_key
    return httpx.get(
        f"{replicas.stack.base_url}/models/{replicas.model}/export",
        params={"format": fmt},
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    )


def _untar(data: bytes, dest: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
        root = tar.getnames()[0].split("/")[0]
    return dest / root


def _greedy(model, tok, messages: list[dict], template: str | None = None) -> str:  # type: ignore[no-untyped-def]
    import torch

    enc = tok.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    return str(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def test_export_round_trips_and_is_owner_only(replicas: Replicas, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [training_prompt(3), [{"role": "user", "content": "Where is my package? It is late."}]]
    served = [
        replicas.client.chat.completions.create(
            model=replicas.model, messages=p, temperature=0, max_tokens=40
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    response = _export(replicas, "peft")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    adapter = _untar(response.content, tmp_path / "peft")
    base_dir = replicas.stack.home / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    template = (adapter / "chat_template.jinja").read_text()
    assert [_greedy(model, tok, p, template) for p in prompts] == served

    merged = _export(replicas, "merged")
    assert merged.status_code == 200, merged.text
    full = _untar(merged.content, tmp_path / "merged")
    assert (full / "model.safetensors").is_file() and (full / "tokenizer.json").is_file()
    merged_model = AutoModelForCausalLM.from_pretrained(full).eval()
    assert [_greedy(merged_model, AutoTokenizer.from_pretrained(full), p) for p in prompts] == served
    cached = replicas.stack.home / "exports" / replicas.job_id
    assert [p.name for p in cached.glob("*/merged/config.json")] == ["config.json"]  # built once, kept

    outsider = replicas.stack.key("replica-outsider-org")
    assert _export(replicas, "peft", key=outsider).status_code == 404
    bad = _export(replicas, "onnx")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"


def test_gguf_export_reads_back_with_the_served_template(replicas: Replicas, tmp_path: Path) -> None:
    """``format=gguf`` through the CLI: merged f16 and q8_0, the LoRA, the Modelfile; the files hold
    the tokenizer, the chat template the model is served with and its stop token."""
    import gguf

    started = time.monotonic()
    target = tmp_path / "model-gguf.tar"
    env = {
        **replicas.stack.env,
        "LORAFORGE_BASE_URL": replicas.stack.base_url,
        "LORAFORGE_API_KEY": replicas.client.api_key,
    }
    command = ["models", "export", replicas.model, "--format", "gguf", "-o", str(target)]
    done = subprocess.run(
        [sys.executable, "-m", "loraforge", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    elapsed = time.monotonic() - started
    with tarfile.open(target) as tar:
        tar.extractall(tmp_path / "gguf", filter="data")
        names = sorted(n.split("/", 1)[1] for n in tar.getnames())
    assert names == ["Modelfile", "README.md", "lora-f32.gguf", "model-f16.gguf", "model-q8_0.gguf"]
    root = next((tmp_path / "gguf").iterdir())
    manifest = json.loads(next((replicas.stack.home / "exports").rglob("merged/manifest.json")).read_text())
    for name, kind in (("model-f16.gguf", "F16"), ("model-q8_0.gguf", "Q8_0")):
        reader = gguf.GGUFReader(root / name)
        tensors = {t.name: t.tensor_type.name for t in reader.tensors}
        assert len(tensors) == 21 and tensors["blk.1.attn_v.weight"] == kind, tensors
        assert reader.fields["general.name"].contents() == replicas.model
        assert reader.fields["tokenizer.chat_template"].contents() == manifest["chat_template"]
        eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
        assert reader.fields["tokenizer.ggml.tokens"].contents()[eos] == manifest["stop_tokens"][0]
    lora = gguf.GGUFReader(root / "lora-f32.gguf")
    assert lora.fields["adapter.type"].contents() == "lora" and len(lora.tensors) == 2 * 7 * 2
    assert 'PARAMETER stop "<|eot_id|>"' in (root / "Modelfile").read_text()
    print(f"gguf export (merged already cached): {elapsed:.1f}s")


def test_trial_limit_and_delete_unloads_everywhere(replicas: Replicas) -> None:
    client = replicas.client
    file_id = replicas.file_id
    with pytest.raises(openai.BadRequestError) as exc:
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id)
    assert exc.value.code == "hosted_model_limit_reached"
    assert client.models.delete(replicas.model).deleted is True
    for url in replicas.urls:
        assert replicas.model not in _health(url)["adapters"]
    assert not (replicas.stack.home / "exports" / replicas.job_id).exists()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=replicas.model, messages=training_prompt(3))
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id)  # the slot is free again
    client.fine_tuning.jobs.cancel(job.id)
