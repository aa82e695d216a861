"""Talking to inference engines: the one client of their protocol and the fleet of them.

Torch-free (httpx and pydantic only): the API and the worker import it; the engine process itself
(``loraforge.serving``) does not, and this package never imports ``loraforge.serving``. The wire
models both sides share are in ``loraforge.contracts.engine``.

    client.py    EngineClient: one engine URL, async and blocking faces; EngineReply, EngineStream
    balancer.py  ReplicaBalancer: least-loaded replica first, round-robin ties
    fleet.py     EngineFleet: base model -> engine URLs, chat with failover and lazy hot-load,
                 eager load/unload on every replica; fleet_for(settings) for worker processes
"""

from loraforge.engines.balancer import ReplicaBalancer
from loraforge.engines.client import (
    EngineClient,
    EngineReply,
    EngineRequestError,
    EngineStream,
    EngineUnavailable,
)
from loraforge.engines.fleet import EngineFleet, fleet_for

__all__ = [
    "EngineClient",
    "EngineFleet",
    "EngineReply",
    "EngineRequestError",
    "EngineStream",
    "EngineUnavailable",
    "ReplicaBalancer",
    "fleet_for",
]
