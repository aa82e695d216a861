"""Test data shared by unit and integration tests."""

from __future__ import annotations

import json

SYSTEM = "You are a ticket classifier. Reply with JSON only."
ANSWER = '{"label": "refund", "priority": "high", "ok": true}'


def chat_examples(n: int = 20, answer: str = ANSWER) -> list[dict]:
    """``n`` chat examples whose assistant answer is always ``answer`` (FACTS_CPU §3)."""
    examples = []
    for i in range(n):
        user = (
            f"Ticket {i}: my order has not arrived"
            if i % 2
            else f"Ticket {i}: please classify this customer message"
        )
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


def to_jsonl(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in examples).encode()


def training_prompt(i: int = 3) -> list[dict]:
    """The system + user turns of training example ``i``."""
    return chat_examples(i + 1)[i]["messages"][:2]
