"""ASGI pieces the two HTTP apps (the API and the engine) share to handle untrusted requests:
a request-body limit that answers in OpenAI's envelope, and JSON parsing that refuses the
non-standard numbers (``NaN``, ``Infinity``) Python's ``json`` accepts.

Framework-level only (Starlette/FastAPI and ``loraforge.contracts``): no database, no torch.
"""

from __future__ import annotations

from loraforge.asgi.body_limit import BodyLimitMiddleware
from loraforge.asgi.strict_json import BadJSONValue, StrictJSONRoute, loads_strict

__all__ = ["BadJSONValue", "BodyLimitMiddleware", "StrictJSONRoute", "loads_strict"]
