"""What every client command shares: the SDK client from the environment, error reporting,
consoles and formatting.

Data goes to stdout (ids, tables: what a script captures); progress, live displays and errors go
to stderr, so ``FILE=$(loraforge files upload train.jsonl)`` works.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

if TYPE_CHECKING:
    from openai import OpenAI

# Piped output is not cut to 80 columns: ids in tables must stay whole for scripts.
_PIPE_WIDTH = 200
out = Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPE_WIDTH)

P = ParamSpec("P")
R = TypeVar("R")

TERMINAL = ("succeeded", "failed", "cancelled")


def base_url() -> str:
    """``LORAFORGE_BASE_URL``, else ``OPENAI_BASE_URL``, else this machine's API (settings)."""
    url = os.environ.get("LORAFORGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if url:
        return url
    from loraforge.settings import get_settings

    settings = get_settings()
    return f"http://{settings.api_host}:{settings.api_port}/v1"


def make_client() -> OpenAI:
    """The ``openai`` SDK client, configured like the SDK (LORAFORGE_* wins over OPENAI_*)."""
    from openai import OpenAI

    key = os.environ.get("LORAFORGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not key:
        err.print(
            "[red]No API key: set LORAFORGE_API_KEY (or OPENAI_API_KEY).[/red] "
            "Create one with `loraforge keys create --org NAME`."
        )
        raise typer.Exit(2)
    return OpenAI(base_url=base_url(), api_key=key)


def api_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Report the API's errors (OpenAI's envelope) as one readable line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import openai

        try:
            return func(*args, **kwargs)
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") or exc.message
            extras = ", ".join(f"{k}={body[k]}" for k in ("code", "param") if body.get(k))
            if exc.status_code in (404, 405) and "Unknown request URL" in str(message):
                extras = "this server does not have that endpoint"
            err.print(f"[red]Error {exc.status_code}:[/red] {message}" + (f" ({extras})" if extras else ""))
            raise typer.Exit(1) from None
        except openai.APIConnectionError:
            err.print(f"[red]Cannot reach the API at {base_url()}[/red] (is `loraforge serve` running?)")
            raise typer.Exit(1) from None

    return wrapper


def fmt_time(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """``"64MiB"``, ``"8MB"``, ``"512k"``, ``"4096"`` -> bytes (binary units either way).

    Raises:
        typer.BadParameter: the text is not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"not a size: {text!r} (e.g. 64MiB, 512KB, 4096)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()[:1]
    size = int(number * _UNITS[unit])
    if size < 1:
        raise typer.BadParameter("size must be at least 1 byte")
    return size


def dump(obj: Any) -> str:
    """An SDK object as indented JSON (extra fields the server sent included)."""
    return obj.model_dump_json(indent=2) if hasattr(obj, "model_dump_json") else str(obj)
