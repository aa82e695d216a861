"""The LoRA recipe: ``train(spec, emit)`` = setup -> train -> save -> cleanup.

An explicit Accelerate + PEFT loop (no ``transformers.Trainer``): one process, one device. The
loss is the mean cross-entropy over assistant tokens only (labels != -100); the same spec gives
the same loss sequence on CPU (seeded LoRA init, seeded data order, no other randomness).

Progress is reported through ``emit(dict)``; the CLI prints each dict as one JSON line.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from loraforge.adapters.format import (
    ADAPTER_CONFIG,
    MANIFEST,
    AdapterManifest,
    LoraSettings,
    write_manifest,
)
from loraforge.catalog.catalog import BaseModelEntry, load_catalog
from loraforge.catalog.loading import load_model, load_tokenizer
from loraforge.trainer.data import (
    IGNORE_INDEX,
    TokenizedExample,
    TrainingDataError,
    collate,
    read_chat_jsonl,
    tokenize_dataset,
)
from loraforge.trainer.hyperparams import ResolvedHyperparameters, resolve_hyperparameters, steps_per_epoch
from loraforge.trainer.spec import TrainSpec

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

# Trainer's defaults: no weight decay on the adapter, clip the gradient norm at 1.0.
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0


@dataclass
class TrainingRun:
    """Everything :func:`setup` builds and the later phases use."""

    spec: TrainSpec
    entry: BaseModelEntry
    accelerator: Accelerator
    tokenizer: Any
    model: Any
    optimizer: Any
    train_set: list[TokenizedExample]
    valid_set: list[TokenizedExample]
    hyperparameters: ResolvedHyperparameters
    lora: LoraSettings
    total_steps: int
    train_tokens_per_epoch: int
    # Filled by train_loop: the last step's train metrics and the last validation metrics.
    metrics: dict[str, float] = field(default_factory=dict)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    return device


def _lora_settings(spec: TrainSpec, entry: BaseModelEntry) -> LoraSettings:
    defaults = entry.lora
    return LoraSettings(
        r=spec.lora_r if spec.lora_r is not None else defaults.r,
        alpha=spec.lora_alpha if spec.lora_alpha is not None else defaults.alpha,
        dropout=spec.lora_dropout if spec.lora_dropout is not None else defaults.dropout,
        target_modules=list(spec.lora_target_modules or defaults.target_modules),
    )


def setup(spec: TrainSpec) -> TrainingRun:
    """Phase 1: read and tokenize the data, resolve hyperparameters, build model and optimizer.

    Data is validated before the model is loaded, so a bad file fails fast.

    Args:
        spec: the run's spec.

    Returns:
        The prepared run.

    Raises:
        TrainingDataError: the training or validation file is invalid.
        ValueError: the base model is not in the catalog.
    """
    if spec.torch_threads > 0:
        torch.set_num_threads(spec.torch_threads)
    catalog = load_catalog(Path(spec.models_config) if spec.models_config else None)
    entry = catalog.get(spec.base_model)
    if entry is None:
        raise ValueError(f"base model {spec.base_model!r} is not in the model catalog")
    train_examples = read_chat_jsonl(spec.training_file)
    valid_examples = (
        read_chat_jsonl(spec.validation_file, param="validation_file", min_examples=1)
        if spec.validation_file
        else []
    )

    models_dir = Path(spec.models_dir)
    tokenizer = load_tokenizer(entry, models_dir)
    max_len = min(spec.max_seq_length or entry.max_seq_length, entry.context_length)
    train_set = tokenize_dataset(tokenizer, train_examples, max_len)
    valid_set = tokenize_dataset(tokenizer, valid_examples, max_len)
    train_tokens = sum(ex.n_label_tokens for ex in train_set)
    if train_tokens == 0:
        raise TrainingDataError(
            "invalid_training_file",
            "Training file has no assistant tokens to train on (all have weight 0 or were truncated)",
        )
    hp = resolve_hyperparameters(spec.hyperparameters, len(train_set), entry)
    total_steps = hp.n_epochs * steps_per_epoch(len(train_set), hp.batch_size)

    device = _resolve_device(spec.device)
    accelerator = Accelerator(cpu=device == "cpu")
    model = load_model(entry, models_dir, device=str(accelerator.device))
    lora = _lora_settings(spec, entry)
    # Seed right before the LoRA init: building a builtin model above reseeds the global RNG.
    torch.manual_seed(spec.seed)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=hp.learning_rate, weight_decay=WEIGHT_DECAY, fused=accelerator.device.type == "cuda"
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    logger.info(
        "setup: %s on %s, %d examples (%d trained tokens/epoch), %s, %d steps, %d trainable params",
        entry.id,
        accelerator.device,
        len(train_set),
        train_tokens,
        hp.model_dump(),
        total_steps,
        sum(p.numel() for p in params),
    )
    return TrainingRun(
        spec=spec,
        entry=entry,
        accelerator=accelerator,
        tokenizer=tokenizer,
        model=model,
        optimizer=optimizer,
        train_set=train_set,
        valid_set=valid_set,
        hyperparameters=hp,
        lora=lora,
        total_steps=total_steps,
        train_tokens_per_epoch=train_tokens,
    )


def _forward(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Summed next-token CE over labelled tokens, number correct (argmax), number labelled."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
    return loss_sum, int(correct.item()), int(valid.sum().item())


def _batches(
    examples: list[TokenizedExample], order: list[int], batch_size: int
) -> list[list[TokenizedExample]]:
    return [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def evaluate(run: TrainingRun) -> dict[str, float]:
    """Token-weighted loss and accuracy over the whole validation set.

    Args:
        run: the prepared run (its ``valid_set`` must be non-empty).

    Returns:
        ``{"valid_loss", "valid_mean_token_accuracy"}``.
    """
    pad_id = run.tokenizer.pad_token_id
    loss_total, correct_total, count_total = 0.0, 0, 0
    run.model.eval()
    with torch.no_grad():
        for chunk in _batches(run.valid_set, list(range(len(run.valid_set))), run.hyperparameters.batch_size):
            loss_sum, correct, count = _forward(
                run.model, _to_device(collate(chunk, pad_id), run.accelerator.device)
            )
            loss_total += loss_sum.item()
            correct_total += correct
            count_total += count
    run.model.train()
    return {
        "valid_loss": loss_total / max(count_total, 1),
        "valid_mean_token_accuracy": correct_total / max(count_total, 1),
    }


def train_loop(run: TrainingRun, emit: Emit) -> dict[str, float]:
    """Phase 2: the optimisation loop; emits ``metrics`` lines.

    A line is emitted every ``spec.log_every`` steps, on the last step, and at each epoch end
    when there is a validation set (with ``valid_loss``/``valid_mean_token_accuracy`` merged in).

    Args:
        run: the prepared run.
        emit: receives each metrics dict.

    Returns:
        The final metrics (last step's train metrics plus the last validation metrics).
    """
    spec, hp, model, optimizer = run.spec, run.hyperparameters, run.model, run.optimizer
    pad_id = run.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(spec.seed)
    n = len(run.train_set)
    step, started = 0, time.monotonic()
    model.train()
    for epoch in range(1, hp.n_epochs + 1):
        order = torch.randperm(n, generator=generator).tolist()
        batches = _batches(run.train_set, order, hp.batch_size)
        for index, chunk in enumerate(batches):
            batch = _to_device(collate(chunk, pad_id), run.accelerator.device)
            loss_sum, correct, count = _forward(model, batch)
            loss = loss_sum / max(count, 1)
            run.accelerator.backward(loss)
            run.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run.metrics.update(
                train_loss=float(loss.item()), train_mean_token_accuracy=correct / max(count, 1)
            )
            epoch_end = index == len(batches) - 1
            validate = epoch_end and bool(run.valid_set)
            if validate:
                run.metrics.update(evaluate(run))
            if validate or step % spec.log_every == 0 or step == run.total_steps:
                line: dict[str, Any] = {
                    "type": "metrics",
                    "step": step,
                    "total_steps": run.total_steps,
                    "epoch": epoch,
                    "train_loss": run.metrics["train_loss"],
                    "train_mean_token_accuracy": run.metrics["train_mean_token_accuracy"],
                }
                if validate:
                    line["valid_loss"] = run.metrics["valid_loss"]
                    line["valid_mean_token_accuracy"] = run.metrics["valid_mean_token_accuracy"]
                emit(line)
    logger.info("trained %d steps in %.2f s, final %s", step, time.monotonic() - started, run.metrics)
    return dict(run.metrics)


def _install(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` adapter to ``final``, replacing an earlier adapter (a retry)."""
    if final.exists():
        if not final.is_dir() or not (
            not any(final.iterdir()) or (final / ADAPTER_CONFIG).exists() or (final / MANIFEST).exists()
        ):
            raise FileExistsError(f"{final} exists and is not an adapter directory; refusing to replace it")
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(trash / final.name)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)


def save(run: TrainingRun, metrics: dict[str, float]) -> AdapterManifest:
    """Phase 3: write the PEFT pair and ``manifest.json`` to a temp sibling, then rename it.

    A run killed before the rename leaves only a hidden ``.<name>.partial-*`` directory, never a
    half-written ``output_dir``.

    Args:
        run: the trained run.
        metrics: the final metrics for the manifest.

    Returns:
        The manifest written.
    """
    final = Path(run.spec.output_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        run.accelerator.unwrap_model(run.model).save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)
        manifest = AdapterManifest(
            job_id=run.spec.job_id,
            base_model=run.entry.id,
            base_weights=run.entry.weights,
            chat_template=run.entry.chat_template_text,
            stop_tokens=list(run.entry.stop_tokens),
            lora=run.lora,
            hyperparameters=run.hyperparameters.model_dump(),
            metrics=metrics,
            trained_tokens=run.train_tokens_per_epoch * run.hyperparameters.n_epochs,
            total_steps=run.total_steps,
            spec_hash=run.spec.spec_hash(),
        )
        write_manifest(tmp, manifest)
        # mkdtemp/mkstemp create private (0700/0600) entries; the engine may run as another user.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("adapter written to %s", final)
    return manifest


def cleanup(run: TrainingRun) -> None:
    """Phase 4: drop references to the model and optimizer and free accelerator memory.

    Args:
        run: the finished (or failed) run.
    """
    run.model = run.optimizer = None
    run.accelerator.free_memory()


def train(spec: TrainSpec, emit: Emit) -> AdapterManifest:
    """Fine-tune a LoRA adapter on ``spec.training_file`` and write it to ``spec.output_dir``.

    Emits, in order: one ``hyperparameters`` dict, ``metrics`` dicts during training, and one
    ``done`` dict after the adapter is in place (see the package docstring for the shapes).

    Args:
        spec: what to train.
        emit: called with each progress dict (the CLI prints them as JSON lines).

    Returns:
        The manifest written into the adapter directory.

    Raises:
        TrainingDataError: the training or validation file is invalid.
    """
    run = setup(spec)
    try:
        hp = run.hyperparameters
        emit(
            {
                "type": "hyperparameters",
                "n_epochs": hp.n_epochs,
                "batch_size": hp.batch_size,
                "learning_rate_multiplier": hp.learning_rate_multiplier,
                "learning_rate": hp.learning_rate,
                "total_steps": run.total_steps,
                "n_examples": len(run.train_set),
                "train_tokens_per_epoch": run.train_tokens_per_epoch,
            }
        )
        metrics = train_loop(run, emit)
        manifest = save(run, metrics)
    finally:
        cleanup(run)
    emit(
        {
            "type": "done",
            "adapter_dir": str(Path(spec.output_dir).resolve()),
            "trained_tokens": manifest.trained_tokens,
            "total_steps": manifest.total_steps,
            "train_loss": metrics["train_loss"],
        }
    )
    return manifest
