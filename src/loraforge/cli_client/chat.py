"""``loraforge chat MODEL``: streaming chat with a base model, a fine-tuned model or a checkpoint.

Interactive by default (``/reset`` clears the history, ``/exit`` or Ctrl-D quits); ``--message``
sends one message, prints the streamed answer and exits (for scripts and tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.prompt import Prompt

from loraforge.cli_client.common import api_errors, err, make_client, out

if TYPE_CHECKING:
    from openai import OpenAI


def stream_reply(
    client: OpenAI, model: str, messages: list[dict[str, Any]], temperature: float, max_tokens: int
) -> str:
    """Stream one answer to stdout as it arrives; returns the full text."""
    stream = client.chat.completions.create(
        model=model,
        messages=cast(Any, messages),
        stream=True,
        temperature=temperature,
        max_tokens=max_tokens,
    )
    parts: list[str] = []
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta and choice.delta.content:
            parts.append(choice.delta.content)
            out.print(choice.delta.content, end="", highlight=False, markup=False, soft_wrap=True)
            out.file.flush()
        finish = choice.finish_reason or finish
    out.print()
    if finish == "length":
        err.print("[dim](stopped at max tokens)[/dim]")
    return "".join(parts)


@api_errors
def chat(
    model: Annotated[str, typer.Argument(help="Model id: base, ft:..., or a checkpoint ...:ckpt-step-N")],
    message: Annotated[str | None, typer.Option("--message", "-m", help="Send one message and exit")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy)")] = 0.7,
    max_tokens: Annotated[int, typer.Option(help="Most tokens in an answer")] = 256,
) -> None:
    """Chat with MODEL, streaming the answers."""
    client = make_client()
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if message is not None:
        stream_reply(client, model, [*history, {"role": "user", "content": message}], temperature, max_tokens)
        return
    err.print(f"Chatting with [bold]{model}[/bold]. /reset clears the history, /exit or Ctrl-D quits.")
    start = len(history)
    while True:
        try:
            text = Prompt.ask("[bold cyan]you[/bold cyan]", console=err)
        except (EOFError, KeyboardInterrupt):
            err.print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            del history[start:]
            err.print("[dim]history cleared[/dim]")
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        err.print("[bold magenta]assistant[/bold magenta]: ", end="")
        try:
            reply = stream_reply(client, model, history, temperature, max_tokens)
        except KeyboardInterrupt:
            err.print("\n[dim](interrupted)[/dim]")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
