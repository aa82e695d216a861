"""JSON bodies parsed as JSON is specified: ``NaN``, ``Infinity`` and ``-Infinity`` are refused.

Python's ``json`` accepts those three words (and reads ``1e400`` as infinity) and turns them
into floats that then pass range checks they should fail (``NaN >= 0`` is false, but so is
``NaN < 0``), travel in fields nobody validates (an unknown chat parameter relayed to the
engine) and make ``json.dumps`` or an HTTP client raise later: a 500 for what is the client's
mistake. :class:`StrictJSONRoute` parses request bodies with :func:`loads_strict`, which answers
such a body with a 400 naming the parameter. A number too long for Python to convert (over 4,300
digits) is refused the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from loraforge.contracts.envelope import loc_to_param

CODE = "invalid_number"


class BadJSONValue(HTTPException):
    """A 400 for a body that is JSON only by Python's lenient reading.

    A Starlette ``HTTPException`` so that FastAPI passes it through its body parsing unchanged;
    the apps' handlers read ``param`` and ``code`` from it.
    """

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(status_code=400, detail=message)
        self.param = param
        self.code = CODE


class _NonFinite:
    __slots__ = ("word",)

    def __init__(self, word: str) -> None:
        self.word = word


def _find(value: Any, path: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str] | None:
    if isinstance(value, _NonFinite):
        return path, value.word
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _find(item, (*path, key))
        if found is not None:
            return found
    return None


def loads_strict(body: bytes | str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` and unconvertible numbers.

    Args:
        body: the request body.

    Returns:
        The parsed value.

    Raises:
        BadJSONValue: a non-finite or unconvertible number (with the parameter it was sent as).
        json.JSONDecodeError: the body is not JSON at all.
    """
    seen: list[bool] = []

    def constant(word: str) -> _NonFinite:
        seen.append(True)
        return _NonFinite(word)

    def number(text: str) -> float | _NonFinite:
        value = float(text)
        return value if math.isfinite(value) else constant(text)  # 1e400 reads as inf

    try:
        value = json.loads(body, parse_constant=constant, parse_float=number)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # int() refuses numbers over sys.get_int_max_str_digits() digits
        raise BadJSONValue(f"The request body has a number this server cannot read: {exc}", None) from exc
    if seen:
        found = _find(value, ())
        assert found is not None
        path, word = found
        param = loc_to_param(path)
        message = (
            f"Invalid value for '{param}': {word} is not a JSON number; send a finite number."
            if param
            else f"{word} is not a JSON number; send a finite number."
        )
        raise BadJSONValue(message, param)
    return value


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An ``APIRoute`` whose JSON body is parsed with :func:`loads_strict`.

    Use it as ``APIRouter(route_class=StrictJSONRoute)`` on every router that takes JSON bodies.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
