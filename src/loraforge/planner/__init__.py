"""The memory planner: how a job trains, chosen at creation from the model and the worker pools.

Pure Python (no torch): the API imports it. ``memory`` estimates the peak memory of one device,
``plan`` picks pool, strategy, GPU count, checkpointing and token budget, ``pools`` lists the
deployment's worker pools. See README "Memory planner".
"""

from loraforge.planner.memory import MemoryEstimate, RunShape, estimate
from loraforge.planner.plan import JobPlan, NoFit, plan_job
from loraforge.planner.pools import detect_pools, resolve_pools

__all__ = [
    "JobPlan",
    "MemoryEstimate",
    "NoFit",
    "RunShape",
    "detect_pools",
    "estimate",
    "plan_job",
    "resolve_pools",
]
