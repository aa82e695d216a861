"""Padding-free packing and the chunked loss compute what the padded, full-logits path computes.

All on the tiny model in fp32 on CPU (sdpa). Tolerances: losses rtol 1e-5; each LoRA gradient
tensor within a relative L2 error of 1e-5 (``||a - b|| / ||b||``): the same sums taken in another
order and through another mask layout, so single elements near zero can differ relatively more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.catalog import load_catalog
from loraforge.contracts.train_spec import TrainPlan
from loraforge.trainer.data import IGNORE_INDEX, TokenizedExample, tokenize_dataset
from loraforge.trainer.packing import first_fit_decreasing, pack, padded_groups, step_micro_batches

torch = pytest.importorskip("torch")

TINY = "loraforge/tiny-llama"
LOSS_RTOL = 1e-5
GRAD_REL_L2 = 1e-5


def varied_examples(n: int) -> list[list[dict]]:
    """Chats of different lengths with different assistant answers (so the docs differ)."""
    out = []
    for i in range(n):
        answer = " ".join(f"label {i} priority {i % 3}" for _ in range(i % 4 + 1))
        out.append(
            [
                {"role": "system", "content": "You are a ticket classifier."},
                {"role": "user", "content": f"Ticket {i}: " + "my order is late " * (i % 5 + 1)},
                {"role": "assistant", "content": answer},
            ]
        )
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loraforge.catalog.loading import load_model, load_tokenizer, resolve_weights

    entry = load_catalog().get(TINY)
    models_dir = tmp_path_factory.mktemp("models")
    resolve_weights(entry, models_dir)
    tokenizer = load_tokenizer(entry, models_dir)
    examples = tokenize_dataset(tokenizer, varied_examples(7))
    return entry, models_dir, tokenizer, examples, load_model


def lora_model(tiny, seed: int = 0):
    """A fresh tiny model with a LoRA whose B is random too (so every LoRA grad is non-zero)."""
    from peft import LoraConfig, get_peft_model

    entry, models_dir, _, _, load_model = tiny
    base = load_model(entry, models_dir)
    base.set_attn_implementation("sdpa")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def step(model, examples: list[TokenizedExample], pad_id: int, mode: str = "full", **layout):
    """One step's loss, accuracy and LoRA gradients through the trainer's own functions."""
    from loraforge.trainer.loss import CausalLMLoss
    from loraforge.trainer.step import forward_backward

    model.zero_grad(set_to_none=True)
    micro = step_micro_batches(examples, pad_token_id=pad_id, **layout)
    stats = forward_backward(
        CausalLMLoss(model, mode, chunk_rows=7),
        micro,
        device=torch.device("cpu"),
        backward=torch.Tensor.backward,
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return stats, grads, micro


def assert_same(a, b) -> float:
    """Same step statistics and LoRA gradients; returns the worst relative L2 gradient error."""
    (stats_a, grads_a, _), (stats_b, grads_b, _) = a, b
    worst = 0.0
    assert stats_a.n_targets == stats_b.n_targets > 0
    assert stats_a.loss == pytest.approx(stats_b.loss, rel=LOSS_RTOL)
    assert stats_a.accuracy == pytest.approx(stats_b.accuracy, abs=1e-12)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        error = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm()
        assert error < GRAD_REL_L2, (name, float(error))
        worst = max(worst, float(error))
    return worst


def test_packed_and_padded_steps_give_the_same_loss_and_lora_gradients(tiny) -> None:
    _, _, tokenizer, examples, _ = tiny
    model = lora_model(tiny)
    pad_id = tokenizer.pad_token_id
    padded = step(model, examples, pad_id, packing=False, token_budget=None)
    packed = step(model, examples, pad_id, packing=True, token_budget=None)
    # Several micro-batches (first-fit decreasing, ~2 docs each) accumulate to the same step.
    budget = 2 * max(len(ex.input_ids) for ex in examples)
    packed_small = step(model, examples, pad_id, packing=True, token_budget=budget)
    padded_small = step(model, examples, pad_id, packing=False, token_budget=budget)
    assert len(packed[2]) == 1 and len(packed_small[2]) > 1 and len(padded_small[2]) > 1
    assert all(mb.input_ids.shape[1] <= budget for mb in packed_small[2])
    assert packed[2][0].attention_mask is None and padded[2][0].attention_mask is not None
    # Padding-free: the packed row holds exactly the real tokens.
    assert packed[2][0].input_ids.numel() == sum(len(ex.input_ids) for ex in examples)
    assert_same(padded, packed)
    assert_same(padded, packed_small)
    assert_same(padded, padded_small)


def test_chunked_loss_matches_full_logits(tiny) -> None:
    _, _, tokenizer, examples, _ = tiny
    model = lora_model(tiny)
    pad_id = tokenizer.pad_token_id
    for layout in ({"packing": True, "token_budget": None}, {"packing": False, "token_budget": None}):
        full = step(model, examples, pad_id, "full", **layout)
        chunked = step(model, examples, pad_id, "chunked", **layout)  # 7-row chunks: many
        assert full[0].n_targets > 7
        assert_same(full, chunked)


def test_packed_forward_matches_documents_one_by_one(tiny) -> None:
    """No attention across documents: each packed document's logits equal its own forward's.

    Pins transformers' packed-sequence detection (position-id restarts, no attention mask, no
    KV cache); with a cache built it silently attends across documents (FACTS_GPU).
    """
    _, _, _, examples, _ = tiny
    model = lora_model(tiny).eval()
    mb = pack(examples[:4])
    with torch.no_grad():
        packed = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits[0]
        start = 0
        for ex in examples[:4]:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            got = packed[start : start + len(ex.input_ids)]
            # Logits here are O(10) (the tiny lm_head has std 1); attending across documents
            # moved them by ~0.6 (FACTS_GPU), float reordering by ~1e-5.
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-4)
            start += len(ex.input_ids)


def test_positions_restart_and_targets_stay_inside_documents(tiny) -> None:
    _, _, tokenizer, examples, _ = tiny
    docs = examples[:3]
    mb = pack(docs, pad_token_id=tokenizer.pad_token_id, pad_to_multiple=64)
    positions, targets = mb.position_ids[0].tolist(), mb.targets[0].tolist()
    start = 0
    for ex in docs:
        n = len(ex.input_ids)
        assert positions[start : start + n] == list(range(n))
        # targets[i] is the label of token i+1 of the same document ...
        assert targets[start : start + n - 1] == ex.labels[1:]
        # ... and a document's last token never targets the next document's first token.
        assert targets[start + n - 1] == IGNORE_INDEX
        start += n
    # The filler rounding the row up to 64 is a document of its own with no targets.
    assert len(positions) % 64 == 0 and mb.n_tokens == start
    assert positions[start:] == list(range(len(positions) - start))
    assert set(targets[start:]) <= {IGNORE_INDEX}
    assert mb.n_targets == sum(ex.n_label_tokens for ex in docs) - sum(
        1 for ex in docs if ex.labels[0] != IGNORE_INDEX
    )


def test_bin_packing_covers_every_document_once_within_budget() -> None:
    lengths = [50, 10, 300, 40, 40, 90, 5, 120, 60]
    for budget in (100, 128, 400):
        groups = first_fit_decreasing(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert sum(lengths[i] for i in g) <= budget or len(g) == 1  # 300 > 100: alone
        padded = padded_groups(lengths, budget)
        assert sorted(i for g in padded for i in g) == list(range(len(lengths)))
        for g in padded:
            assert max(lengths[i] for i in g) * len(g) <= budget or len(g) == 1
    assert first_fit_decreasing(lengths, None) == [list(range(len(lengths)))]
    assert first_fit_decreasing([], 10) == []


def test_plan_defaults_pack_everything_in_one_micro_batch() -> None:
    plan = TrainPlan()
    assert plan.packing and plan.token_budget is None and plan.loss == "auto"
    from loraforge.trainer.loss import resolve_loss_mode

    assert resolve_loss_mode("auto", "cpu") == "full"
    assert resolve_loss_mode("chunked", "cpu") == "chunked"
    assert resolve_loss_mode("auto", "cuda", world_size=2) == "chunked"
    assert resolve_loss_mode("full", "cuda") == "full"


def test_trainer_run_on_packed_layout_with_budget_and_chunked_loss(tmp_path: Path, tiny) -> None:
    """The whole trainer (recipe + loop) with micro-batches and the chunked loss still learns."""
    import json

    from loraforge.contracts.train_spec import TrainSpec
    from loraforge.trainer import train

    _, models_dir, _, _, _ = tiny
    records = [{"messages": m} for m in varied_examples(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = TrainSpec(
        job_id="ftjob-pack",
        base_model=TINY,
        models_dir=str(models_dir),
        training_file=str(tmp_path / "train.jsonl"),
        output_dir=str(tmp_path / "adapter"),
        hyperparameters={"n_epochs": 3, "batch_size": 4},
        plan=TrainPlan(token_budget=96, loss="chunked"),
    )
    events: list[dict] = []
    train(spec, events.append)
    losses = [e["train_loss"] for e in events if e["type"] == "metrics"]
    assert len(losses) == 9 and losses[-1] < losses[0]
    assert events[-1]["type"] == "done"
