"""DPO training: the step over preference pairs, and the reference policy's log-probabilities.

The reference policy is the model the run starts from: the base with the adapter disabled for a
fresh LoRA (``disable_adapter()``, the same weights, no copy), or the starting adapter itself
when continuing from a fine-tuned model (``spec.init_adapter``: the adapter then trains on, and
what it was before the first step is the reference). Either way the reference's log-probabilities
are computed once, before the first step, under ``no_grad`` in eval mode (:func:`reference_logps`),
and kept in the run's state; checkpoints store them, so a resumed run (pause, crash recovery)
uses exactly the same reference instead of recomputing it from weights that have since moved.

A step's loss is the mean over its pairs of :func:`~loraforge.trainer.dpo_logps.dpo_loss`. Each
micro-batch holds whole pairs, and its summed loss is scaled by ``world / pairs in the step``
before its backward, so accumulated gradients equal those of the whole step at once (as the
supervised step does with tokens).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import torch

from loraforge.trainer import distributed as dist
from loraforge.trainer.data import IGNORE_INDEX
from loraforge.trainer.dpo_data import PreferencePair
from loraforge.trainer.dpo_logps import PairBatch, dpo_loss, pair_micro_batches
from loraforge.trainer.packing import MicroBatch
from loraforge.trainer.step import StepStats, autocast

if TYPE_CHECKING:
    from loraforge.trainer.training_run import TrainingRun

logger = logging.getLogger(__name__)

# The per-step numbers a DPO step reports besides its loss (the loop prefixes train_/valid_).
REWARD_METRICS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "rewards_margin")


def shard_pairs(pairs: list[PreferencePair], rank: int, world: int) -> list[PreferencePair]:
    """This rank's share of a step's pairs: longest first, dealt round-robin."""
    if world <= 1:
        return list(pairs)
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i].n_tokens, i))
    return [pairs[i] for i in sorted(order[rank::world])]


def _filler(pad_token_id: int) -> PairBatch:
    """A one-token micro-batch of no pair (keeps ranks' collectives paired under FSDP)."""
    micro = MicroBatch(
        input_ids=torch.tensor([[pad_token_id]], dtype=torch.long),
        targets=torch.tensor([[IGNORE_INDEX]], dtype=torch.long),
        position_ids=torch.tensor([[0]], dtype=torch.long),
        attention_mask=None,
    )
    empty = torch.zeros(0, dtype=torch.long)
    return PairBatch(micro=micro, seq_index=torch.full((1, 1), -1), pairs=[], seq_targets=empty)


def _micro_batches(run: TrainingRun, pairs: list[PreferencePair]) -> list[PairBatch]:
    plan = run.spec.plan
    return pair_micro_batches(
        shard_pairs(pairs, dist.rank(), dist.world_size()),
        packing=plan.packing,
        token_budget=plan.token_budget,
        pad_token_id=run.data.tokenizer.pad_token_id,
        pad_to_multiple=run.model.pad_to_multiple,
    )


def _forward(run: TrainingRun, pairs: list[PreferencePair], each: Any) -> None:
    """Run this rank's micro-batches of ``pairs``; call ``each(batch, logps, correct, anchor)``.

    Every rank runs the same number of micro-batches (FSDP's collectives must pair up).
    """
    batches = _micro_batches(run, pairs)
    device = run.model.accelerator.device
    n_micro = len(batches)
    if dist.world_size() > 1:
        count = torch.tensor([n_micro], dtype=torch.long, device=device)
        n_micro = int(dist.all_reduce(count, op="max").item())
    for i in range(n_micro):
        batch = batches[i] if i < len(batches) else _filler(run.data.tokenizer.pad_token_id)
        with autocast(device.type, run.model.compute_dtype):
            logps, correct, anchor = run.optim.loss_module(**batch.model_inputs(device))
        each(batch, logps, correct, anchor)


def _reference_context(run: TrainingRun) -> contextlib.AbstractContextManager[Any]:
    """The reference policy: the adapter disabled for a fresh LoRA, the starting adapter otherwise."""
    if run.spec.init_adapter:
        return contextlib.nullcontext()
    return run.model.peft.disable_adapter()  # type: ignore[no-any-return]


def reference_logps(run: TrainingRun, pairs: list[PreferencePair]) -> torch.Tensor:
    """The reference policy's ``[len(pairs), 2]`` (chosen, rejected) log-probabilities.

    Computed in eval mode under ``no_grad``, a batch of pairs at a time, laid out as training
    lays them out; under FSDP each rank computes its share and the table is summed over ranks.

    Args:
        run: the prepared run (before its first step).
        pairs: one split's pairs, ``pairs[i].index == i``.

    Returns:
        The table (fp32, on the CPU).
    """
    device = run.model.accelerator.device
    table = torch.zeros((len(pairs), 2), dtype=torch.float64, device=device)

    def keep(batch: PairBatch, logps: torch.Tensor, _correct: torch.Tensor, _anchor: torch.Tensor) -> None:
        if batch.pairs:
            index = torch.tensor([p.index for p in batch.pairs], device=device)
            table[index] = logps.detach().double().view(-1, 2)

    size = max(1, run.data.hyperparameters.batch_size)
    run.model.peft.eval()
    with torch.no_grad(), _reference_context(run):
        for start in range(0, len(pairs), size):
            _forward(run, pairs[start : start + size], keep)
    run.model.peft.train()
    return dist.all_reduce(table).float().cpu()


def ensure_reference(run: TrainingRun) -> None:
    """Compute the reference tables once (a resumed run has them from its checkpoint).

    Args:
        run: the prepared run.
    """
    state = run.state
    if state.reference is not None:
        return
    state.reference = {
        "train": reference_logps(run, run.data.train_set),
        "valid": reference_logps(run, run.data.valid_set),
    }
    logger.info("dpo: reference log-probs of %d + %d pairs", len(run.data.train_set), len(run.data.valid_set))


def run_step(run: TrainingRun, pairs: list[PreferencePair], *, train: bool) -> StepStats:
    """One DPO step (``train``: with backward) over ``pairs``; the loss and rewards over all ranks.

    Args:
        run: the prepared run (its reference tables computed).
        pairs: the step's pairs (all ranks'), of one split.
        train: accumulate gradients (else call under ``torch.no_grad()``).

    Returns:
        The step's mean DPO loss, the chosen completions' token accuracy, ``n_targets`` = pairs,
        and ``extra`` = the reward metrics of :data:`REWARD_METRICS`.
    """
    assert run.state.reference is not None, "ensure_reference() runs before the first step"
    device = run.model.accelerator.device
    world, beta = dist.world_size(), run.spec.beta()
    n_pairs = len(pairs)  # every rank sees the whole step's pairs
    scale = world / max(n_pairs, 1)
    # loss, chosen reward, rejected reward, accurate pairs, chosen hits, chosen targets, tokens
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    backward = run.model.accelerator.backward if train else None

    def step(batch: PairBatch, logps: torch.Tensor, correct: torch.Tensor, anchor: torch.Tensor) -> None:
        if batch.pairs:
            split = batch.pairs[0].split
            index = torch.tensor([p.index for p in batch.pairs])
            ref = run.state.reference[split][index].to(device)  # type: ignore[index]
            losses, chosen, rejected = dpo_loss(logps[0::2], logps[1::2], ref[:, 0], ref[:, 1], beta)
            loss = losses.sum()
        else:
            losses = chosen = rejected = torch.zeros(0, device=device)
            loss = torch.zeros((), device=device)
        if backward is not None:
            backward((loss + anchor) * scale)
        chosen_targets = batch.seq_targets[0::2].sum().item() if batch.pairs else 0
        totals.add_(
            torch.stack(
                [
                    losses.detach().double().sum(),
                    chosen.double().sum(),
                    rejected.double().sum(),
                    (chosen > rejected).double().sum(),
                    correct[0::2].double().sum(),
                    torch.tensor(float(chosen_targets), dtype=torch.float64, device=device),
                    torch.tensor(float(batch.micro.n_tokens), dtype=torch.float64, device=device),
                ]
            )
        )

    _forward(run, pairs, step)
    summed = dist.all_reduce(totals)
    n = max(n_pairs, 1)
    loss, chosen, rejected, accurate, hits, targets, tokens = (float(v) for v in summed.tolist())
    return StepStats(
        loss=loss / n,
        accuracy=hits / max(targets, 1.0),
        n_targets=n_pairs,
        n_tokens=int(tokens),
        extra={
            "rewards_chosen": chosen / n,
            "rewards_rejected": rejected / n,
            "rewards_accuracy": accurate / n,
            "rewards_margin": (chosen - rejected) / n,
        },
    )
