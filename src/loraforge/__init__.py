"""loraforge: a self-hosted, OpenAI-compatible LoRA fine-tuning service."""

__version__ = "0.1.0"
