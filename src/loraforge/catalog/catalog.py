"""The base-model catalog: which models can be fine-tuned and served, and with what defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# All seven linear projections of a Llama block.
LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraDefaults(BaseModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))


class ModelArch(BaseModel):
    """The decoder shapes the memory planner needs (Hugging Face ``LlamaConfig`` field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False

    @property
    def kv_size(self) -> int:
        """Width of the k and v projections (grouped-query attention)."""
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)


# Pre-planner catalog strategy names, still accepted in an operator's models.yaml.
_LEGACY_STRATEGIES = {"bf16_lora": "lora", "cpu": "lora"}


class TrainingTarget(BaseModel):
    """How a base model trains. The memory planner (``loraforge.planner``) picks the strategy,
    GPU count and micro-batch size per job; the fields here only constrain or override it."""

    # Weights dtype the trainer loads the base with (and the planner sizes it with).
    dtype: str = "bfloat16"
    # Devices it may train on, preferred first: a CPU-first model (tiny-llama) plans onto a cpu
    # pool when there is one; a big model lists only cuda, so it is never sent to a CPU.
    devices: list[Literal["cuda", "cpu"]] = Field(default_factory=lambda: ["cuda"], min_length=1)
    # "auto": the planner's preference order (lora, qlora, fsdp); anything else forces that one.
    strategy: Literal["auto", "lora", "qlora", "fsdp"] = "auto"
    # FSDP only: use exactly this many GPUs (None: the fewest that fit).
    gpus: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _legacy_strategy(cls, data: Any) -> Any:
        # ``{strategy: cpu, gpus: 0}`` meant "train on the CPU"; ``bf16_lora`` is now ``lora``.
        if isinstance(data, dict) and data.get("strategy") in _LEGACY_STRATEGIES:
            data = dict(data)
            if data["strategy"] == "cpu":
                data.setdefault("devices", ["cpu", "cuda"])
                data.pop("gpus", None)
            data["strategy"] = _LEGACY_STRATEGIES[data["strategy"]]
        return data


# Modules whose LoRA is an embedding adapter (vLLM serves these only for some models/versions).
EMBEDDING_MODULES = ("embed_tokens", "lm_head")


class ServingTarget(BaseModel):
    """What the engine serving this base model accepts in an adapter.

    The defaults are what a stock vLLM server accepts for Llama (``vllm/lora/peft_helper.py``):
    LoRA on the seven linear projections, no DoRA, no ``modules_to_save``, no embedding or
    ``lm_head`` adapters; rank up to the server's ``--max-lora-rank`` (vLLM's default is 16, so a
    vLLM replica for a base with ``max_lora_rank: 64`` must be started with ``--max-lora-rank 64``).
    A job whose LoRA settings break these limits is refused at creation (``jobs/compat.py``) and
    an adapter that breaks them is refused at load (``serving/lora.py``).
    """

    max_lora_rank: int = 64
    # LoRA target modules (last name segment) the serving engine can apply.
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))
    # Weight-decomposed LoRA (vLLM: "does not yet support DoRA").
    dora: bool = False
    # Fully trained extra modules saved with the adapter (vLLM: "only supports modules_to_save being None").
    modules_to_save: bool = False
    # LoRA on embed_tokens / lm_head.
    embedding_adapters: bool = False

    def supports_module(self, name: str) -> bool:
        """Whether a LoRA on module ``name`` (its last segment) can be served."""
        short = name.rsplit(".", 1)[-1]
        return short in self.target_modules or (self.embedding_adapters and short in EMBEDDING_MODULES)


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
    # Shapes for the memory planner; None: the planner cannot size the model and trusts the pool.
    arch: ModelArch | None = None
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
