"""A LoRA adapter trained here on the tiny model (FACTS_CPU §3), shared by the serving tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from loraforge.adapters.format import AdapterManifest, LoraSettings, write_manifest
from loraforge.catalog.loading import load_model, load_tokenizer

BASE = "loraforge/tiny-llama"
SYSTEM = "You are a ticket classifier. Reply with JSON only."
ANSWER = '{"label": "refund", "priority": "high", "ok": true}'
ANSWER_B = '{"label": "shipping", "priority": "low", "ok": false}'
PROMPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Ticket 4: my order has not arrived"},
]


def _examples(answer: str) -> list[list[dict[str, str]]]:
    users = ["Ticket {i}: my order has not arrived", "Ticket {i}: please classify this customer message"]
    return [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": users[i % 2].format(i=i)},
            {"role": "assistant", "content": answer},
        ]
        for i in range(20)
    ]


def train_adapter(
    entry, models_dir: Path, out: Path, answer: str = ANSWER, job_id: str = "ftjob-test"
) -> None:
    """FACTS_CPU §3 recipe: r=16 all-linear, lr 5e-3, batch 4, 100 steps, assistant-only labels."""
    tok = load_tokenizer(entry, models_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(entry, models_dir),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    encoded = [
        tok.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        for m in _examples(answer)
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(100):
        batch = [encoded[(step * 4 + j) % len(encoded)] for j in range(4)]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((4, width), tok.pad_token_id)
        labels = torch.full((4, width), -100)
        mask = torch.zeros((4, width), dtype=torch.long)
        for j, e in enumerate(batch):
            row = torch.tensor(e["input_ids"])
            ids[j, : len(row)], mask[j, : len(row)] = row, 1
            labels[j, : len(row)] = torch.where(torch.tensor(e["assistant_masks"]).bool(), row, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    manifest = AdapterManifest(
        job_id=job_id,
        base_model=entry.id,
        base_weights=entry.weights,
        chat_template=entry.chat_template_text,
        stop_tokens=entry.stop_tokens,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["all-linear"]),
        hyperparameters={"n_epochs": 20, "learning_rate": 5e-3, "batch_size": 4},
        total_steps=100,
    )
    write_manifest(out, manifest)
