"""Watching a job: live step/total, a loss sparkline and the ETA, with new events printed as they
come. On a terminal this is a rich live display; otherwise (pipes, CI logs) plain lines.
Ctrl-C stops the watching only: the job is the server's and keeps running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from loraforge.cli_client.common import TERMINAL, err, fmt_duration, fmt_time

if TYPE_CHECKING:
    from openai import OpenAI

BLOCKS = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


def sparkline(values: list[float], width: int = 40) -> str:
    """The whole series as at most ``width`` unicode blocks (bucket means), scaled min..max.

    The whole run is shown, not its tail, so the fall of the loss stays visible to the end.
    """
    series = [v for v in values if v == v]  # drop NaN
    if not series:
        return ""
    if len(series) > width:
        edges = [round(i * len(series) / width) for i in range(width + 1)]
        series = [sum(series[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False) if b > a]
    lo, hi = min(series), max(series)
    span = hi - lo or 1.0
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[min(top, int((v - lo) / span * top + 0.5))] for v in series)


def new_events(client: OpenAI, job_id: str, seen: set[str]) -> list[Any]:
    """Events not in ``seen`` (marked seen), oldest first; pages newest-first until a known one."""
    fresh: list[Any] = []
    after: str | None = None
    for _ in range(100):
        jobs = client.fine_tuning.jobs
        page = (
            jobs.list_events(job_id, limit=100, after=after) if after else jobs.list_events(job_id, limit=100)
        )
        unseen = [e for e in page.data if e.id not in seen]
        fresh.extend(unseen)
        if not page.has_more or len(unseen) < len(page.data) or not page.data:
            break
        after = page.data[-1].id
    seen.update(e.id for e in fresh)
    return list(reversed(fresh))


@dataclass
class WatchState:
    """What the display shows, updated from the job and its events."""

    job: Any
    step: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    valid_loss: float | None = None
    accuracy: float | None = None
    first_metric_at: float | None = None
    first_step: int = 0

    def add_metrics(self, data: dict[str, Any]) -> None:
        self.step = int(data.get("step", self.step))
        self.total = int(data.get("total_steps") or self.total)
        if data.get("train_loss") is not None:
            self.losses.append(float(data["train_loss"]))
        if data.get("valid_loss") is not None:
            self.valid_loss = float(data["valid_loss"])
        if data.get("train_mean_token_accuracy") is not None:
            self.accuracy = float(data["train_mean_token_accuracy"])
        if self.first_metric_at is None:
            self.first_metric_at, self.first_step = time.monotonic(), self.step

    def eta(self) -> float | None:
        """Seconds left: the server's ``estimated_finish`` if set, else from the step rate."""
        if self.job.status in TERMINAL:
            return None
        # The observed step rate once there are a few steps; before that the server's estimate.
        if self.first_metric_at and self.step > self.first_step + 2 and self.total:
            rate = (time.monotonic() - self.first_metric_at) / (self.step - self.first_step)
            return rate * (self.total - self.step)
        if getattr(self.job, "estimated_finish", None):
            return max(0.0, self.job.estimated_finish - time.time())
        return None

    def line(self) -> str:
        """One plain-text progress line."""
        parts = [f"{self.job.id} {self.job.status}"]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        if self.losses:
            parts.append(f"loss {self.losses[-1]:.4f} {sparkline(self.losses, 20)}")
        if self.valid_loss is not None:
            parts.append(f"valid {self.valid_loss:.4f}")
        if (eta := self.eta()) is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        return "  ".join(parts)

    def render(self) -> Group:
        """The live display."""
        status = self.job.status
        head = Text.assemble(
            (self.job.id, "bold"), "  ", (status, STATUS_STYLE.get(status, "yellow")), "  ", self.job.model
        )
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        if self.total:
            bar = ProgressBar(total=self.total, completed=self.step, width=40)
            grid.add_row("step", Group(Text(f"{self.step}/{self.total}"), bar))
        if self.losses:
            grid.add_row("loss", Text(f"{self.losses[-1]:.4f}  ") + Text(sparkline(self.losses), "magenta"))
        if self.valid_loss is not None:
            grid.add_row("valid loss", f"{self.valid_loss:.4f}")
        if self.accuracy is not None:
            grid.add_row("token acc", f"{self.accuracy * 100:.1f}%")
        grid.add_row("ETA", fmt_duration(self.eta()))
        return Group(head, grid)


def _print_event(event: Any) -> None:
    style = {"warn": "yellow", "error": "red"}.get(event.level, "")
    err.print(
        Text.assemble((fmt_time(event.created_at), "dim"), "  ", (event.message, style)), soft_wrap=True
    )


def watch_job(client: OpenAI, job_id: str, interval: float = 1.0, show_metrics: bool = False) -> Any:
    """Follow a job until it finishes; returns the final job.

    Message events are printed as they arrive; metrics feed the display (and are printed too
    when ``show_metrics``). Raises KeyboardInterrupt on Ctrl-C, the job untouched.

    Args:
        client: the SDK client.
        job_id: the job to follow.
        interval: seconds between polls.
        show_metrics: print every metrics event as a line as well.
    """
    state = WatchState(client.fine_tuning.jobs.retrieve(job_id))
    seen: set[str] = set()
    last_line = 0.0

    def poll() -> None:
        state.job = client.fine_tuning.jobs.retrieve(job_id)
        for event in new_events(client, job_id, seen):
            if event.type == "metrics" and event.data:
                state.add_metrics(dict(event.data))
                if not show_metrics:
                    continue
            _print_event(event)

    if err.is_terminal:
        with Live(state.render(), console=err, refresh_per_second=4, transient=False) as live:
            while True:
                poll()
                live.update(state.render())
                if state.job.status in TERMINAL:
                    return state.job
                time.sleep(interval)
    while True:
        poll()
        # Plain output: a progress line every few seconds, and always the last one.
        if state.job.status in TERMINAL or time.monotonic() - last_line > 3:
            err.print(state.line(), highlight=False, soft_wrap=True)
            last_line = time.monotonic()
        if state.job.status in TERMINAL:
            return state.job
        time.sleep(interval)
