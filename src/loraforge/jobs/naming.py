"""Public names of fine-tuned models and their checkpoints."""

from __future__ import annotations

from loraforge.ids import random_token


def fine_tuned_model_name(base_model: str, org_name: str, suffix: str | None) -> str:
    """``ft:{base}:{org}:{suffix}:{id8}``, OpenAI's shape (empty suffix segment when none)."""
    return f"ft:{base_model}:{org_name}:{suffix or ''}:{random_token(8)}"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"
