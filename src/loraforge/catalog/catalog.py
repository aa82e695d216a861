"""The base-model catalog: which models can be fine-tuned and served, and with what defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

# All seven linear projections of a Llama block.
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraDefaults(BaseModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))


class TrainingTarget(BaseModel):
    strategy: str = "bf16_lora"
    gpus: int = 1
    dtype: str = "bfloat16"


class ServingTarget(BaseModel):
    max_lora_rank: int = 64


class BaseModelEntry(BaseModel):
    """One base model: its public id, where its weights are, and its training/serving defaults."""

    id: str
    aliases: list[str] = Field(default_factory=list)
    weights: str  # hub id, local path, or ``builtin:<name>``
    owned_by: str = "loraforge"
    created: int = 0
    context_length: int
    max_seq_length: int
    base_learning_rate: float
    max_batch_size: int = 8
    chat_template: str  # file name under configs/templates/
    stop_tokens: list[str] = Field(default_factory=list)
    lora: LoraDefaults = Field(default_factory=LoraDefaults)
    training: TrainingTarget = Field(default_factory=TrainingTarget)
    serving: ServingTarget = Field(default_factory=ServingTarget)
    # Filled in by the loader: the template text itself.
    chat_template_text: str = ""


class Catalog:
    """Lookup of base models by id or alias."""

    def __init__(self, entries: list[BaseModelEntry]) -> None:
        self._entries = entries
        self._by_name: dict[str, BaseModelEntry] = {}
        for entry in entries:
            for name in [entry.id, *entry.aliases]:
                self._by_name[name] = entry

    def get(self, model_id: str) -> BaseModelEntry | None:
        """The entry for ``model_id`` (an id or an alias), or None."""
        return self._by_name.get(model_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def default_models_config() -> Path:
    """``configs/models.yaml`` of the source tree this package was installed from."""
    return Path(__file__).resolve().parents[3] / "configs" / "models.yaml"


@lru_cache(maxsize=8)
def _load(path: Path) -> Catalog:
    raw = yaml.safe_load(path.read_text())
    templates = path.parent / "templates"
    entries = []
    for item in raw.get("models", []):
        entry = BaseModelEntry.model_validate(item)
        entry.chat_template_text = (templates / entry.chat_template).read_text()
        entries.append(entry)
    return Catalog(entries)


def load_catalog(path: Path | None = None) -> Catalog:
    """Read the catalog from ``path`` (default: the repository's ``configs/models.yaml``)."""
    path = (path or default_models_config()).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"model catalog not found at {path}; set LORAFORGE_MODELS_CONFIG to configs/models.yaml"
        )
    return _load(path)
