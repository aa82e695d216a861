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


# Tool calling: "what's the weather in X" -> get_weather({"city": X}) (OpenAI's fine-tuning format).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# Distinct first tokens in the tiny model's tokenizer: one token decides which city is meant.
CITIES = ("Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Cairo", "Athens")


def weather_question(city: str) -> list[dict]:
    """The user turn of the tool-calling examples."""
    return [{"role": "user", "content": f"What's the weather in {city}?"}]


def weather_call(city: str, call_id: str = "call_1") -> dict:
    """The assistant's OpenAI tool call for ``city``."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def tool_call_examples(cities: tuple[str, ...] = CITIES) -> list[dict]:
    """One example per city, ending with the assistant's call and no tool answer: how OpenAI's
    format teaches a model to call a tool."""
    return [
        {
            "messages": [
                *weather_question(city),
                {"role": "assistant", "content": None, "tool_calls": [weather_call(city, f"call_{i}")]},
            ],
            "tools": [WEATHER_TOOL],
        }
        for i, city in enumerate(cities)
    ]


# DPO: the same tickets, "low" preferred over "high" (one token apart, so the pair's log-ratio is
# decided at that token). A supervised model trained 3:2 on high:low answers says "high" (the
# rejected one) with "low" close behind; DPO from it flips the greedy answer to "low".
DPO_CHOSEN = ANSWER.replace('"high"', '"low"')


def mixed_chat_examples(n: int = 10) -> list[dict]:
    """``n`` tickets, each three times with :data:`ANSWER` and twice with :data:`DPO_CHOSEN`."""
    tickets = chat_examples(n)
    chosen = [
        {"messages": [*e["messages"][:2], {"role": "assistant", "content": DPO_CHOSEN}]} for e in tickets
    ]
    return [e for e in tickets for _ in range(3)] + [e for e in chosen for _ in range(2)]


def preference_examples(n: int = 10) -> list[dict]:
    """OpenAI's DPO lines for ``n`` tickets: :data:`DPO_CHOSEN` preferred over :data:`ANSWER`."""
    return [
        {
            "input": {"messages": e["messages"][:2]},
            "preferred_output": [{"role": "assistant", "content": DPO_CHOSEN}],
            "non_preferred_output": [{"role": "assistant", "content": ANSWER}],
        }
        for e in chat_examples(n)
    ]
