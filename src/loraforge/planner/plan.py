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
about ``1/L`` of the full-recompute price). The token budget is the largest micro-batch (real
tokens, packed) that fits, rounded down to a multiple of 256 and capped at ``TOKEN_BUDGET_CAP``:
past a few thousand tokens a micro-batch already fills an H100, and a bigger one only buys fewer
optimizer-step boundaries. So with recompute the planner does not buy budget with layers: it
takes the smallest ``k`` at which ``PARTIAL_AC_TARGET_BUDGET`` tokens (or ``max_seq_length``,
whichever is larger) fit, and then the largest budget that ``k`` allows. When even ``k = L`` does
not reach that target, the ``k`` with the largest budget (ties: the fewest layers) is taken.
Without recompute (``k = 0``) nothing changes: the largest budget from ``max_seq_length`` up.
On a CPU pool (no budget: one micro-batch of ``batch_size x max_seq_length`` tokens) ``k`` is the
smallest that fits that micro-batch. Consequences: ``k`` never grows with device memory, and the
budget is monotone in memory only for a fixed strategy and ``k``; when more memory lets layers
stop recomputing (or bf16 replace NF4), the budget may shrink while the run gets faster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.catalog.catalog import BaseModelEntry
from loraforge.planner.memory import ALLOCATOR_HEADROOM, GIB, MemoryEstimate, RunShape, Strategy, estimate
from loraforge.settings import TrainPool
from loraforge.trainer.spec import TrainPlan

TOKEN_BUDGET_CAP = 32768
TOKEN_BUDGET_STEP = 256
# With recompute, the budget the fewest checkpointed layers must reach (module docstring): at 8k
# tokens an 8B step already runs at full speed (FACTS_GPU), more is not worth a recomputed layer.
PARTIAL_AC_TARGET_BUDGET = 8192
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

    Returns:
        The plan with its estimate at the token budget (CPU: at ``batch_size × max_seq_length``),
        or None.
    """
    device = pool.device
    if device == "cpu":
        max_seq_length *= max(batch_size, 1)  # the CPU trainer's micro-batch is the whole step

    def at(tokens: int, k: int) -> MemoryEstimate:
        return estimate(
            shape, strategy=strategy, device=device, tokens=tokens, checkpoint_layers=k, num_devices=num_gpus
        )

    def fits(tokens: int, k: int) -> bool:
        return at(tokens, k).fits(pool.memory_gib)

    k = _checkpoint_layers(fits, shape.arch.num_hidden_layers, max_seq_length, device == "cuda")
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
    fits: Callable[[int, int], bool], num_layers: int, max_seq_length: int, budgeted: bool
) -> int | None:
    """How many layers recompute (module docstring for the policy); None when nothing fits.

    Args:
        fits: whether ``(tokens, k)`` fits the device.
        num_layers: ``L``.
        max_seq_length: the micro-batch that must fit (CPU: the whole step's).
        budgeted: a GPU plan (a token budget is chosen after ``k``); False on a CPU pool.
    """
    if fits(max_seq_length, 0):
        return 0
    fitting = [k for k in range(1, num_layers + 1) if fits(max_seq_length, k)]
    if not fitting:
        return None
    if not budgeted:
        return fitting[0]
    cap = max(TOKEN_BUDGET_CAP, max_seq_length)
    target = min(max(PARTIAL_AC_TARGET_BUDGET, max_seq_length), cap)
    for k in fitting:
        if fits(target, k):
            return k
    # Nothing reaches the target: the most tokens per micro-batch (fewest layers among equals).
    return max(fitting, key=lambda k: (_largest_fitting(lambda n: fits(n, k), max_seq_length, cap), -k))


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
                found = plan_on(shape, pool, strategy, n, max_seq_length, batch)
                if found is not None:
                    return found
    return _no_fit(entry, shape, strategies, tuple(pools), max_seq_length)


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
