"""The CUDA fast path (packing, flex_attention, chunked loss, micro-batches, bf16 autocast) computes
what the CPU path computes. Skipped without CUDA.

Tolerances (stated, and why):

* Loss curve, fp32 on both devices (tiny-llama is fp32 in the catalog; TF32 stays off, torch's
  default for matmuls): the first step's loss within rtol 1e-4 (same weights and data, only kernel
  summation order differs); every later logged loss within 2e-2 relative + 1e-3 absolute (the
  tiny differences compound over 60 optimizer steps at lr 5e-3); both runs memorise (< 0.05).
* Packed forward on flex_attention vs each document alone: logits within 1e-4 (a forward that
  attends across documents is off by ~1, FACTS_GPU).
* One bf16-autocast step vs the fp32 step: loss within 2e-2 relative, LoRA gradient cosine > 0.99.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)"),
]

TINY = "loraforge/tiny-llama"


def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        answer = " ".join(f"label {i} priority {i % 3}" for _ in range(i % 4 + 1))
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a ticket classifier."},
                    {"role": "user", "content": f"Ticket {i}: " + "my order is late " * (i % 5 + 1)},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.catalog import load_catalog
    from loraforge.catalog.loading import resolve_weights

    path = tmp_path_factory.mktemp("models")
    resolve_weights(load_catalog().get(TINY), path)
    return path


def _losses(tmp_path: Path, models_dir: Path, device: str, plan: dict) -> list[float]:
    from loraforge.contracts.train_spec import TrainSpec
    from loraforge.trainer import train

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chats(20)))
    spec = TrainSpec(
        job_id=f"ftjob-{device}",
        base_model=TINY,
        models_dir=str(models_dir),
        training_file=str(data),
        output_dir=str(tmp_path / "adapter"),
        hyperparameters={"n_epochs": 12, "batch_size": 4},
        device=device,
        plan=plan,
    )
    events: list[dict] = []
    train(spec, events.append)
    assert events[-1]["type"] == "done"
    return [e["train_loss"] for e in events if e["type"] == "metrics"]


def test_cuda_fast_path_matches_the_cpu_loss_curve(tmp_path: Path, models_dir: Path) -> None:
    cpu = _losses(tmp_path / "cpu", models_dir, "cpu", {})
    # Two micro-batches per step (token budget), packed rows padded to 128, chunked CE, flex.
    cuda = _losses(tmp_path / "cuda", models_dir, "cuda", {"token_budget": 160, "loss": "chunked"})
    assert len(cpu) == len(cuda) == 60
    assert cuda[0] == pytest.approx(cpu[0], rel=1e-4)
    for step, (a, b) in enumerate(zip(cuda, cpu, strict=True), start=1):
        assert a == pytest.approx(b, rel=2e-2, abs=1e-3), (step, a, b)
    assert cpu[-1] < 0.05 and cuda[-1] < 0.05


def _tiny_peft(models_dir: Path, device: str, dtype):
    from peft import LoraConfig, get_peft_model

    from loraforge.catalog import load_catalog
    from loraforge.catalog.loading import load_model, load_tokenizer
    from loraforge.trainer.device_setup import attn_implementation

    entry = load_catalog().get(TINY)
    base = load_model(entry, models_dir, device=device).to(dtype)
    base.set_attn_implementation(attn_implementation(device))
    torch.manual_seed(0)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config), load_tokenizer(entry, models_dir)


def test_flex_attention_packed_forward_isolates_documents(models_dir: Path) -> None:
    from loraforge.trainer.data import tokenize_dataset
    from loraforge.trainer.packing import pack

    model, tokenizer = _tiny_peft(models_dir, "cuda", torch.float32)
    assert model.get_base_model().config._attn_implementation == "flex_attention"
    docs = tokenize_dataset(tokenizer, [c["messages"] for c in chats(4)])
    mb = pack(docs, pad_token_id=tokenizer.pad_token_id, pad_to_multiple=128)
    model.eval()
    with torch.no_grad():
        packed = model(
            input_ids=mb.input_ids.cuda(), position_ids=mb.position_ids.cuda(), use_cache=False
        ).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc.input_ids], device="cuda"), use_cache=False).logits[0]
            torch.testing.assert_close(
                packed[start : start + len(doc.input_ids)], alone, rtol=1e-4, atol=1e-4
            )
            start += len(doc.input_ids)


def test_bf16_autocast_step_is_close_to_fp32(models_dir: Path) -> None:
    from loraforge.contracts.train_spec import TrainPlan
    from loraforge.trainer.data import tokenize_dataset
    from loraforge.trainer.device_setup import prepare_for_training
    from loraforge.trainer.loss import CausalLMLoss
    from loraforge.trainer.packing import step_micro_batches
    from loraforge.trainer.step import forward_backward

    results = []
    for dtype, autocast in ((torch.float32, None), (torch.bfloat16, torch.bfloat16)):
        model, tokenizer = _tiny_peft(models_dir, "cuda", dtype)
        # PEFT keeps LoRA weights fp32 on a bf16 base; the trainer computes under autocast.
        model = prepare_for_training(model, TrainPlan(), "cuda", autocast)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        docs = tokenize_dataset(tokenizer, [c["messages"] for c in chats(8)])
        micro = step_micro_batches(docs, packing=True, token_budget=256, pad_token_id=0, pad_to_multiple=128)
        stats = forward_backward(
            CausalLMLoss(model, "chunked"),
            micro,
            device=torch.device("cuda"),
            backward=torch.Tensor.backward,
            compute_dtype=autocast,
        )
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
        results.append((stats.loss, grads))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
