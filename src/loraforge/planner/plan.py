"""Choose how a job trains: which worker pool, which strategy, how many GPUs, what micro-batch.

Preference order (the first that fits a micro-batch of ``max_seq_length`` tokens wins):

1. ``lora``: the base in its catalog dtype (bf16) on one device: the fastest per token and the
   only option on a CPU pool.
2. ``qlora``: the base in 4-bit NF4 on one GPU (70B on one 80 GB GPU).
3. ``fsdp``: the bf16 base sharded over the fewest GPUs of one pool (2, 4, 8, ... up to the
   pool's count) that fit.

Fewer GPUs come first (a 70B job on an 8 x 80 GB pool is QLoRA on one of them, leaving seven for
other jobs), then bf16 over 4-bit. A catalog entry can force a strategy (``training.strategy``,
e.g. ``fsdp`` for bf16 70B) and FSDP's GPU count (``training.gpus``). Within a strategy the pools
are tried in the entry's ``training.devices`` order, then in the configured order.

Activation checkpointing is on only when a micro-batch of ``max_seq_length`` tokens does not fit
without it (full recompute costs a third to a half more compute for LoRA, PERF.md §4), and then on
as few decoder layers as the memory needs (the first ``k``: trainer/recompute.py; each costs
about ``1/L`` of the full-recompute price). The rule, in order:

1. ``k = 0`` when ``max_seq_length`` tokens fit without recompute, whatever budget that leaves.
2. Else ``k`` = the fewest layers at which a micro-batch of ``T = max(max_seq_length,
   RECOMPUTE_MIN_TOKENS)`` tokens fits. The floor is modest (2,048 tokens: the size the rule-1
   plans already run at on 40 GiB cards, and PERF.md's reference packed length) because layers
   are never bought for budget: on 8B each recomputed layer costs ~1.5 % of the step, far more
   than a micro-batch past a couple of thousand tokens gains.
3. Else, when only ``max_seq_length`` (below the floor) fits at some ``k``: the ``k`` with the
   lowest peak at ``max_seq_length`` tokens (fewest among equals). This band is narrow (just
   above the least memory the job can run in) and this ``k`` does not depend on the memory,
   which is what keeps the rule monotone: the ``k`` rule 2 takes at the band's top is never
   larger (the formula's peak falls with ``k`` up to ``L - 1``; whether ``k = L`` is lower
   than ``L - 1`` does not get truer at more tokens). "The fewest layers that fit
   ``max_seq_length``" here would recompute *fewer* layers in the band than rule 2 just above it.

Then the token budget is the largest micro-batch (real tokens, packed) that fits at that ``k``,
rounded down to a multiple of 256 and capped at ``TOKEN_BUDGET_CAP``. Consequences: ``k`` never
grows with device memory; the budget is monotone in memory only for a fixed strategy and ``k``
(when more memory lets layers stop recomputing, or bf16 replace NF4, the budget may shrink while
the run gets faster).

``k = L`` versus ``k = L - 1`` (memory.py): all layers checkpointed saves ``N·(A − a·h)`` of saved
activations but the first backward then recomputes into ``2·N·A`` instead of ``N·A``; so ``k = L``
is the *larger* peak (by ``N·a·h``) when the loss transient is small, and the smaller one when
the loss transient exceeds ``N·(A + a·h)`` (8B with its 128k vocabulary: always, at the sizes
planned). It is not always dominated, so it stays a candidate; rule 2 (fewest layers) never
picks it when ``L - 1`` fits, and rule 3 only when it is the lower peak.
On a CPU pool (no budget: one micro-batch of ``batch_size x max_seq_length`` tokens) the floor
does not apply: ``k`` is the fewest that fits that micro-batch.

A DPO job holds two sequences per example (chosen and rejected, in the same micro-batch: the
pair's loss needs both), so its smallest micro-batch is ``2 x max_seq_length`` tokens and a CPU
step ``2 x batch_size x max_seq_length`` (``sequences_per_example=2``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.contracts.train_spec import TrainPlan
from loraforge.planner.memory import ALLOCATOR_HEADROOM, GIB, MemoryEstimate, RunShape, Strategy, estimate
from loraforge.settings import TrainPool

TOKEN_BUDGET_CAP = 32768
TOKEN_BUDGET_STEP = 256
# With recompute, the micro-batch the fewest checkpointed layers must fit when max_seq_length is
# shorter (module docstring, rule 2): modest, so that layers are not bought for budget.
RECOMPUTE_MIN_TOKENS = 2048
PREFERENCE: tuple[Strategy, ...] = ("lora", "qlora", "fsdp")


@dataclass(frozen=True)
class JobPlan:
    """The planner's answer: where the job runs, how, and what it should cost."""

    pool: TrainPool
    train_plan: TrainPlan
    # None when the catalog entry has no ``arch`` (the model could not be sized).
    estimate: MemoryEstimate | None

    def summary(self) -> str:
        """One line for the job's events, e.g. ``lora on 1× cuda 48 GiB (pool gpu), token budget
        8,192, activation checkpointing on 9 of 32 layers; est. peak 43 GiB``."""
        p, plan = self.pool, self.train_plan
        where = (
            f"{p.device} {p.memory_gib:g} GiB"
            if p.device == "cpu"
            else f"{max(plan.num_gpus, 1)}× cuda {p.memory_gib:g} GiB"
        )
        budget = (
            f"token budget {plan.token_budget:,}"
            if plan.token_budget is not None
            else "one micro-batch per step"
        )
        ckpt = "no activation checkpointing"
        if plan.gradient_checkpointing:
            ckpt = "activation checkpointing"
            if self.estimate is not None:
                k, layers = self.estimate.checkpoint_layers, self.estimate.layers
                ckpt = f"activation checkpointing on {k} of {layers} layers"
        peak = (
            f"est. peak {self.estimate.peak / GIB:.0f} GiB"
            if self.estimate is not None
            else "memory not estimated (no arch in the catalog)"
        )
        return f"{plan.strategy} on {where} (pool {p.name}), {budget}, {ckpt}; {peak}"

    def to_record(self) -> dict[str, Any]:
        """What the job stores: the trainer's plan, the pool, and the estimate."""
        return {
            **self.train_plan.model_dump(mode="json"),
            "pool": self.pool.name,
            "device": self.pool.device,
            "memory_gib": self.pool.memory_gib,
            "estimated_peak_gib": round(self.estimate.peak / GIB, 2) if self.estimate else None,
            "breakdown_gib": self.estimate.breakdown_gib() if self.estimate else None,
            "summary": self.summary(),
        }


@dataclass(frozen=True)
class NoFit:
    """Why nothing fits: the smallest single-GPU need and the pools that were tried."""

    # Device memory one GPU would need (cheapest single-GPU strategy, a max_seq_length micro-batch,
    # the cheapest number of recomputed layers, headroom included); None when only FSDP was allowed.
    required_gib: float | None
    strategy: Strategy | None
    pools: tuple[TrainPool, ...]
    eligible_devices: tuple[str, ...]


def _gpu_counts(pool: TrainPool, strategy: Strategy, forced: int | None) -> Iterator[int]:
    if strategy != "fsdp":
        yield 1
        return
    if forced is not None:
        if 2 <= forced <= pool.count:
            yield forced
        return
    n = 2
    while n < pool.count:
        yield n
        n *= 2
    if pool.count >= 2:
        yield pool.count


def _largest_fitting(fits: Callable[[int], bool], lo: int, cap: int) -> int:
    """Largest multiple of ``TOKEN_BUDGET_STEP`` in ``[lo, cap]`` that fits, or ``lo`` (which fits)."""
    # Memory grows with tokens and lo fits: binary search between a step count that fits (good)
    # and one past the cap (bad).
    good, bad = lo // TOKEN_BUDGET_STEP, cap // TOKEN_BUDGET_STEP + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid * TOKEN_BUDGET_STEP):
            good = mid
        else:
            bad = mid
    return max(lo, good * TOKEN_BUDGET_STEP)


def plan_on(
    shape: RunShape,
    pool: TrainPool,
    strategy: Strategy,
    num_gpus: int,
    max_seq_length: int,
    batch_size: int = 1,
    sequences_per_example: int = 1,
) -> JobPlan | None:
    """The plan for one (pool, strategy, GPU count), or None if its smallest micro-batch doesn't fit.

    Args:
        shape: the model, LoRA and dtype.
        pool: the worker pool.
        strategy: ``lora``, ``qlora`` or ``fsdp``.
        num_gpus: GPUs used (1 unless FSDP).
        max_seq_length: the longest example, which must fit in one micro-batch.
        batch_size: examples per optimizer step. On a GPU it does not matter (micro-batches are
            packed to the token budget); on a CPU the whole step is one padded micro-batch of up
            to ``batch_size × max_seq_length`` tokens, which is what must fit.
        sequences_per_example: 2 for DPO (a pair is one example, and never split).

    Returns:
        The plan with its estimate at the token budget (CPU: at ``batch_size × max_seq_length``),
        or None.
    """
    device = pool.device
    max_seq_length *= max(sequences_per_example, 1)  # a DPO pair shares its micro-batch
    if device == "cpu":
        max_seq_length *= max(batch_size, 1)  # the CPU trainer's micro-batch is the whole step

    def at(tokens: int, k: int) -> MemoryEstimate:
        return estimate(
            shape, strategy=strategy, device=device, tokens=tokens, checkpoint_layers=k, num_devices=num_gpus
        )

    def fits(tokens: int, k: int) -> bool:
        return at(tokens, k).fits(pool.memory_gib)

    k = _checkpoint_layers(
        fits, lambda n, k: at(n, k).peak, shape.arch.num_hidden_layers, max_seq_length, device == "cuda"
    )
    if k is None:
        return None
    budget: int | None = None
    tokens = max_seq_length
    if device == "cuda":
        cap = max(TOKEN_BUDGET_CAP, max_seq_length)
        budget = tokens = _largest_fitting(lambda n: fits(n, k), max_seq_length, cap)
    plan = TrainPlan(
        strategy=strategy,
        num_gpus=num_gpus if device == "cuda" else 0,
        token_budget=budget,
        gradient_checkpointing=k > 0,
        checkpoint_layers=k,
    )
    return JobPlan(pool=pool, train_plan=plan, estimate=at(tokens, k))


def _checkpoint_layers(
    fits: Callable[[int, int], bool],
    peak: Callable[[int, int], float],
    num_layers: int,
    max_seq_length: int,
    budgeted: bool,
) -> int | None:
    """How many layers recompute (module docstring, rules 1-3); None when nothing fits.

    Args:
        fits: whether ``(tokens, k)`` fits the device.
        peak: the estimated peak bytes of ``(tokens, k)`` (rule 3's choice; memory-independent).
        num_layers: ``L``.
        max_seq_length: the micro-batch that must fit (CPU: the whole step's).
        budgeted: a GPU plan (a token budget is chosen after ``k``); False on a CPU pool.
    """
    if fits(max_seq_length, 0):
        return 0
    layers = range(1, num_layers + 1)
    target = max(max_seq_length, RECOMPUTE_MIN_TOKENS) if budgeted else max_seq_length
    fewest = next((k for k in layers if fits(target, k)), None)
    if fewest is not None:
        return fewest
    lowest = min(layers, key=lambda k: (peak(max_seq_length, k), k))
    return lowest if fits(max_seq_length, lowest) else None


def _ordered_pools(entry: BaseModelEntry, pools: Sequence[TrainPool]) -> list[TrainPool]:
    devices = entry.training.devices
    eligible = [p for p in pools if p.device in devices]
    return sorted(eligible, key=lambda p: devices.index(p.device))  # stable: config order kept


def plan_job(
    entry: BaseModelEntry,
    pools: Sequence[TrainPool],
    *,
    lora_r: int,
    target_modules: Sequence[str],
    max_seq_length: int,
    batch_size: int | None = None,
    sequences_per_example: int = 1,
) -> JobPlan | NoFit:
    """Plan a job on ``entry`` onto one of ``pools`` (module docstring for the order).

    Args:
        entry: the base model (``arch``, ``training`` overrides).
        pools: the deployment's worker pools.
        lora_r: the job's LoRA rank.
        target_modules: the job's LoRA target modules (explicit names).
        max_seq_length: the job's longest example in tokens.
        batch_size: the job's batch size; None ("auto") sizes a CPU step at the largest batch
            "auto" can pick, the entry's ``max_batch_size``.
        sequences_per_example: sequences one example puts in a micro-batch (DPO: 2).

    Returns:
        The plan, or :class:`NoFit` saying what would be needed.
    """
    ordered = _ordered_pools(entry, pools)
    if entry.arch is None:
        # Nothing to size the model with: trust the operator's catalog and take the first pool.
        if not ordered:
            return NoFit(None, None, tuple(pools), tuple(entry.training.devices))
        pool = ordered[0]
        plan = TrainPlan(num_gpus=1 if pool.device == "cuda" else 0)
        return JobPlan(pool=pool, train_plan=plan, estimate=None)
    shape = RunShape(entry.arch, lora_r, tuple(target_modules), entry.training.dtype)
    batch = batch_size or entry.max_batch_size
    forced = entry.training.strategy
    strategies = PREFERENCE if forced == "auto" else (forced,)
    for strategy in strategies:
        for pool in ordered:
            if strategy != "lora" and pool.device != "cuda":
                continue  # NF4 kernels and NCCL sharding are GPU-only
            for n in _gpu_counts(pool, strategy, entry.training.gpus):
                found = plan_on(shape, pool, strategy, n, max_seq_length, batch, sequences_per_example)
                if found is not None:
                    return found
    return _no_fit(entry, shape, strategies, tuple(pools), max_seq_length * max(sequences_per_example, 1))


def _no_fit(
    entry: BaseModelEntry,
    shape: RunShape,
    strategies: tuple[Strategy, ...],
    pools: tuple[TrainPool, ...],
    max_seq_length: int,
) -> NoFit:
    best: tuple[float, Strategy] | None = None
    for strategy in strategies:
        if strategy == "fsdp":
            continue  # its need depends on the GPU count; the single-GPU figure is the clear one
        # The least over every number of recomputed layers (not always all of them: memory.py).
        peak = min(
            estimate(shape, strategy=strategy, device="cuda", tokens=max_seq_length, checkpoint_layers=k).peak
            for k in range(shape.arch.num_hidden_layers + 1)
        )
        need = peak / (1 - ALLOCATOR_HEADROOM) / GIB
        if best is None or need < best[0]:
            best = (need, strategy)
    return NoFit(
        required_gib=best[0] if best else None,
        strategy=best[1] if best else None,
        pools=pools,
        eligible_devices=tuple(entry.training.devices),
    )


# A single 80 GB GPU: what the duration estimate assumes when no pool is known (preflight).
NOMINAL_GPU = TrainPool(name="nominal", device="cuda", count=1, memory_gib=80)
NOMINAL_CPU = TrainPool(name="nominal-cpu", device="cpu", count=1, memory_gib=64)


def nominal_strategy(entry: BaseModelEntry) -> str:
    """How ``entry`` trains with its catalog LoRA on its preferred device, deployment aside.

    ``cpu`` for a CPU-first model, else the strategy planned for one 80 GB GPU (``lora``,
    ``qlora``), ``fsdp`` when even that does not fit. The pre-flight's default throughput is
    looked up by it.
    """
    if entry.training.devices[0] == "cpu":
        return "cpu"
    result = plan_job(
        entry,
        [NOMINAL_GPU],
        lora_r=entry.lora.r,
        target_modules=entry.lora.target_modules,
        max_seq_length=entry.max_seq_length,
    )
    return result.train_plan.strategy if isinstance(result, JobPlan) else "fsdp"
