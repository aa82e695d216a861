"""DPO: the loss checked against TRL's DPOTrainer on the tiny model, the pair layout, the file
reader, the planner's two sequences per example, the API's method and beta, and a run that
pauses and resumes exactly."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraforge.catalog import load_catalog
from loraforge.contracts.train_spec import TrainSpec
from loraforge.planner import JobPlan, plan_job
from loraforge.settings import TrainPool
from loraforge.trainer import TrainingDataError
from loraforge.trainer.data import IGNORE_INDEX, TokenizedExample
from loraforge.trainer.dpo_data import PreferencePair, read_preference_jsonl, tokenize_pair
from tests.helpers import ANSWER, DPO_CHOSEN, preference_examples, to_jsonl
from tests.unit.test_api import sdk

TINY = "loraforge/tiny-llama"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(models_dir: Path):  # type: ignore[no-untyped-def]
    from loraforge.catalog.loading import load_tokenizer

    return load_tokenizer(load_catalog().get(TINY), models_dir)


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_bytes(to_jsonl(lines))
    return path


# ------------------------------------------------------------------------------------ data layout


def test_a_pair_labels_only_its_completion_and_shares_the_prompt(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    record = read_preference_jsonl(_write(tmp_path / "pairs.jsonl", preference_examples(10)))[0]
    pair = tokenize_pair(tokenizer, record, None)
    chosen, rejected = pair.chosen, pair.rejected
    first = next(i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX)
    # The prompt (everything before the completion) is the same tokens on both sides.
    assert chosen.input_ids[:first] == rejected.input_ids[:first]
    assert all(label == IGNORE_INDEX for label in rejected.labels[:first])
    # Only the completion and its end-of-turn token are labelled, contiguously, to the end.
    assert all(label != IGNORE_INDEX for label in chosen.labels[first:])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.decode([t for t in chosen.labels[first:] if t != eot]).strip() == DPO_CHOSEN
    assert tokenizer.decode([t for t in rejected.labels[first:] if t != eot]).strip() == ANSWER
    assert pair.n_tokens == len(chosen.input_ids) + len(rejected.input_ids)


def test_prompt_assistant_turns_are_context_not_trained(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    line = preference_examples(1)[0]
    line["input"]["messages"] += [
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "again?"},
    ]
    path = _write(tmp_path / "turns.jsonl", [line])
    pair = tokenize_pair(tokenizer, read_preference_jsonl(path, min_examples=1)[0], None)
    labelled = tokenizer.decode([t for t in pair.chosen.labels if t != IGNORE_INDEX])
    assert "earlier answer" not in labelled and DPO_CHOSEN in labelled


def test_bad_preference_files_name_the_line(tmp_path: Path) -> None:
    lines = preference_examples(10)
    broken = [*lines[:3], {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}]
    with pytest.raises(TrainingDataError) as bad:
        read_preference_jsonl(_write(tmp_path / "bad.jsonl", broken + lines[3:]))
    assert bad.value.code == "invalid_training_file" and "line 4" in bad.value.message
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}] * 10
    with pytest.raises(TrainingDataError, match="line 1"):
        read_preference_jsonl(_write(tmp_path / "chat.jsonl", chat))
    with pytest.raises(TrainingDataError) as few:
        read_preference_jsonl(_write(tmp_path / "few.jsonl", lines[:3]))
    assert few.value.code == "invalid_n_examples"


def _pair(i: int, chosen: int, rejected: int) -> PreferencePair:
    def side(n: int, tok: int) -> TokenizedExample:
        return TokenizedExample(input_ids=[tok] * n, labels=[IGNORE_INDEX] * (n // 2) + [tok] * (n - n // 2))

    return PreferencePair(split="train", index=i, chosen=side(chosen, 1), rejected=side(rejected, 2))


def test_micro_batches_keep_pairs_whole_and_map_positions_to_sequences() -> None:
    from loraforge.trainer.dpo_logps import pair_micro_batches

    pairs = [_pair(0, 6, 4), _pair(1, 8, 8), _pair(2, 3, 5)]
    packed = pair_micro_batches(pairs, packing=True, token_budget=16, pad_token_id=0)
    assert sorted(p.index for b in packed for p in b.pairs) == [0, 1, 2]
    for batch in packed:
        assert batch.micro.n_tokens == sum(p.n_tokens for p in batch.pairs) <= 16
        # Sequence 2k is pair k's chosen side, 2k+1 its rejected side, -1 nothing.
        ids, index = batch.micro.input_ids[0].tolist(), batch.seq_index[0].tolist()
        assert {ids[j] for j, s in enumerate(index) if s % 2 == 0} == {1}
        assert {ids[j] for j, s in enumerate(index) if s % 2 == 1} == {2}
        # Labelled targets per sequence: its labels shifted by one (the first label is no target).
        lengths = [len(side.input_ids) for p in batch.pairs for side in (p.chosen, p.rejected)]
        assert batch.seq_targets.tolist() == [n - n // 2 for n in lengths]
    [padded] = pair_micro_batches(pairs, packing=False, token_budget=None, pad_token_id=0)
    assert padded.micro.input_ids.shape == (6, 8) and padded.seq_index[:, 0].tolist() == list(range(6))
    assert padded.seq_index[3].tolist() == [3] * 8  # pair 1's rejected side fills its row
    assert padded.seq_index[4].tolist() == [4] * 3 + [-1] * 5  # pair 2's chosen side, then padding


# ------------------------------------------------------------------------------------ the loss vs TRL


@pytest.mark.slow  # imports TRL (~10-25 s) and runs the tiny model
def test_loss_and_rewards_match_trl_dpo_trainer(tmp_path: Path, models_dir: Path) -> None:
    """TRL's own DPOTrainer computes the loss of a batch with a PEFT policy and its starting adapter
    as the reference; ours, from the same tokens, agrees to 1e-5 in both layouts."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from loraforge.catalog.loading import load_model, load_tokenizer
    from loraforge.trainer.dpo_logps import SequenceLogps, dpo_loss, pair_micro_batches

    entry = load_catalog().get(TINY)
    tok = load_tokenizer(entry, models_dir)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    # In fp64, so that both sides' sums of ~450 nats agree to far below 1e-5 (fp32's ulp there is 3e-5).
    model = get_peft_model(load_model(entry, models_dir).double(), lora)
    rows = [
        {
            "prompt": p["input"]["messages"],
            "chosen": p["preferred_output"],
            "rejected": p["non_preferred_output"],
        }
        for p in preference_examples(4)
    ]
    beta = 0.5
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        max_length=None,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # TRL's batch is [chosen..., rejected...]; ours are the same rows without their padding.
    sides = []
    for ids, keep, completion in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        n = int(keep.sum())
        sides.append(
            TokenizedExample(
                input_ids=ids[:n].tolist(),
                labels=[
                    t if c else IGNORE_INDEX
                    for t, c in zip(ids[:n].tolist(), completion[:n].tolist(), strict=True)
                ],
            )
        )
    pairs = [PreferencePair("train", i, sides[i], sides[i + 4]) for i in range(4)]
    # Our reader and template give TRL's tokens: the same prompt + completion sequences.
    ours = tokenize_pair(
        tok, read_preference_jsonl(_write(tmp_path / "p.jsonl", preference_examples(10)))[0], None
    )
    assert (
        ours.chosen.input_ids[: len(sides[0].input_ids)] == sides[0].input_ids[: len(ours.chosen.input_ids)]
    )

    module = SequenceLogps(trainer.model, "full")
    trainer.model.eval()

    def logps(packing: bool) -> torch.Tensor:
        out = []
        for mb in pair_micro_batches(
            pairs, packing=packing, token_budget=None, pad_token_id=tok.pad_token_id
        ):
            out.append(module(**mb.model_inputs("cpu"))[0].view(-1, 2))
        return torch.cat(out)

    with torch.no_grad():
        reference = logps(True)  # the starting adapter: TRL's "ref" copy of it
        for name, param in trainer.model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.05 * torch.randn_like(param))
        trl_loss = float(trainer._compute_loss(trainer.model, batch, False))
        packed, padded = logps(True), logps(False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert torch.allclose(packed, padded, atol=1e-8)
    losses, chosen, rejected = dpo_loss(packed[:, 0], packed[:, 1], reference[:, 0], reference[:, 1], beta)
    assert trl_loss > 0.7  # the perturbed policy is not the reference
    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-5)
    # TRL logs its rewards and log-probs through fp32: equal to that precision.
    assert float(chosen.mean()) == pytest.approx(metrics["rewards/chosen"], rel=2e-6)
    assert float(rejected.mean()) == pytest.approx(metrics["rewards/rejected"], rel=2e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(metrics["rewards/margins"], rel=2e-6, abs=1e-5)
    assert float(packed[:, 0].mean()) == pytest.approx(metrics["logps/chosen"], rel=2e-6)


# ------------------------------------------------------------------------------------ the planner


def test_the_planner_holds_two_sequences_per_dpo_example() -> None:
    entry = load_catalog().get("meta-llama/Llama-3.1-8B-Instruct")
    assert entry is not None
    gpu = TrainPool(name="gpu", device="cuda", memory_gib=80.0, count=1)
    cpu = TrainPool(name="cpu", device="cpu", memory_gib=64.0, count=1)
    args = {"lora_r": 16, "target_modules": list(entry.lora.target_modules)}
    sft = plan_job(entry, [gpu], max_seq_length=16384, **args)
    dpo = plan_job(entry, [gpu], max_seq_length=16384, sequences_per_example=2, **args)
    assert isinstance(sft, JobPlan) and isinstance(dpo, JobPlan)
    # A pair's micro-batch is twice a sequence: the budget fits both, recompute may be needed.
    assert (dpo.train_plan.token_budget or 0) >= 2 * 16384
    assert dpo.train_plan.checkpointed_layers(32) >= sft.train_plan.checkpointed_layers(32)
    tiny = load_catalog().get(TINY)
    small = {"lora_r": 16, "target_modules": list(tiny.lora.target_modules)}
    one = plan_job(tiny, [cpu], max_seq_length=512, batch_size=2, **small)
    two = plan_job(tiny, [cpu], max_seq_length=512, batch_size=2, sequences_per_example=2, **small)
    assert isinstance(one, JobPlan) and isinstance(two, JobPlan)
    assert one.estimate is not None and two.estimate is not None
    assert two.estimate.peak > one.estimate.peak  # a CPU step: 2 x batch x max_seq_length tokens


# ------------------------------------------------------------------------------------ the API


def test_dpo_jobs_resolve_and_echo_beta(api: TestClient, make_key) -> None:  # type: ignore[no-untyped-def]
    client = sdk(api, make_key("prefs"))
    f = client.files.create(
        file=("p.jsonl", io.BytesIO(to_jsonl(preference_examples()))), purpose="fine-tune"
    )
    auto = client.fine_tuning.jobs.create(model=TINY, training_file=f.id, method={"type": "dpo"})
    assert auto.method.type == "dpo" and auto.method.dpo.hyperparameters.beta == 0.1
    given = client.fine_tuning.jobs.create(
        model=TINY,
        training_file=f.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2}}},
    )
    assert given.method.dpo.hyperparameters.beta == 0.3 and given.method.dpo.hyperparameters.n_epochs == 2
    assert given.plan is not None
    supervised = client.fine_tuning.jobs.create(model=TINY, training_file=f.id)
    assert "beta" not in supervised.hyperparameters.model_dump(exclude_none=True)
    for beta in (0, 2.5):
        resp = api.post(
            "/v1/fine_tuning/jobs",
            headers={"Authorization": f"Bearer {make_key('prefs')}"},
            json={
                "model": TINY,
                "training_file": f.id,
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}},
            },
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "method.dpo.hyperparameters.beta"
    resp = api.post(
        "/v1/fine_tuning/jobs",
        headers={"Authorization": f"Bearer {make_key('prefs')}"},
        json={"model": TINY, "training_file": f.id, "method": {"type": "reinforcement"}},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_method"


def test_dpo_spec_fields() -> None:
    fields = {"job_id": "j", "base_model": TINY, "models_dir": "m", "training_file": "t", "output_dir": "o"}
    sft = TrainSpec.model_validate(fields)
    assert sft.method == "supervised" and sft.beta() == 0.1
    dpo = TrainSpec.model_validate({**fields, "method": "dpo", "dpo_beta": 0.2})
    assert dpo.fingerprint() != sft.fingerprint() and dpo.beta() == 0.2
    with pytest.raises(ValueError, match="dpo_beta"):
        TrainSpec.model_validate({**fields, "dpo_beta": 0.2})


# ------------------------------------------------------------------------------------ a run


def _dpo_spec(folder: Path, models_dir: Path) -> TrainSpec:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = _write(folder / "pairs.jsonl", preference_examples(10))
    return TrainSpec.model_validate(
        {
            "job_id": "ftjob-dpo",
            "base_model": TINY,
            "models_dir": str(models_dir),
            "training_file": str(pairs),
            "validation_file": str(pairs),
            "output_dir": str(folder / "adapter"),
            "hyperparameters": {"n_epochs": 2, "batch_size": 5, "learning_rate_multiplier": 0.1},
            "method": "dpo",
            "dpo_beta": 0.5,
            "checkpoint_dir": str(folder / "ckpt"),
            "pause_file": str(folder / "pause"),
        }
    )


def _metrics(events: list) -> dict[int, dict]:  # type: ignore[type-arg]
    return {e["step"]: e.metrics.model_dump() for e in events if e["type"] == "metrics"}


@pytest.mark.slow  # two tiny DPO runs (4 steps each)
def test_a_dpo_run_pauses_and_resumes_exactly(tmp_path: Path, models_dir: Path) -> None:
    """The reference log-probs travel in the checkpoint: a resumed run takes the same steps (the
    same losses and rewards, the same adapter) as an uninterrupted one, not steps against a
    reference recomputed from weights that have moved."""
    from safetensors.torch import load_file

    from loraforge.trainer import train

    whole: list = []  # type: ignore[type-arg]
    ref_spec = _dpo_spec(tmp_path / "whole", models_dir)
    train(ref_spec, whole.append)
    hp = whole[0]
    assert hp["beta"] == 0.5 and hp["total_steps"] == 4 and hp["n_examples"] == 10
    final = _metrics(whole)[4]
    assert final["train_rewards_accuracy"] == 1.0 and final["full_valid_rewards_accuracy"] == 1.0
    assert final["train_rewards_margin"] == pytest.approx(
        final["train_rewards_chosen"] - final["train_rewards_rejected"]
    )
    assert _metrics(whole)[1]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference

    spec = _dpo_spec(tmp_path / "paused", models_dir)
    first: list = []  # type: ignore[type-arg]

    def pause_after_step_1(event) -> None:  # type: ignore[no-untyped-def]
        first.append(event)
        if event["type"] == "metrics" and event["step"] == 1:
            Path(str(spec.pause_file)).touch()

    assert train(spec, pause_after_step_1) is None
    assert first[-1]["type"] == "paused" and first[-1]["step"] == 1
    Path(str(spec.pause_file)).unlink()
    second: list = []  # type: ignore[type-arg]
    train(spec, second.append)
    assert second[1]["type"] == "resumed" and second[1]["step"] == 1
    assert {**_metrics(first), **_metrics(second)} == _metrics(whole)
    a = load_file(str(Path(spec.output_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(ref_spec.output_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_cli_jobs_create_takes_method_dpo_and_beta(
    api: TestClient, make_key, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from loraforge.cli import app as cli_app
    from loraforge.cli_client import jobs as cli_jobs

    client = sdk(api, make_key("cli-prefs"))
    monkeypatch.setattr(cli_jobs, "make_client", lambda: client)
    f = client.files.create(
        file=("p.jsonl", io.BytesIO(to_jsonl(preference_examples()))), purpose="fine-tune"
    )
    args = ["jobs", "create", "--model", TINY, "--file", f.id, "--method", "dpo", "--beta", "0.4"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    job = client.fine_tuning.jobs.retrieve(result.stdout.strip().splitlines()[-1])
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.4
    refused = CliRunner().invoke(
        cli_app, ["jobs", "create", "--model", TINY, "--file", f.id, "--beta", "0.4"]
    )
    assert refused.exit_code == 2
