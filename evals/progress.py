"""Progress of one task's predict loop: a rich bar on a terminal, plain log lines elsewhere.

Both go to stderr (stdout carries only results). Plain lines (CI logs, `| tee`, nohup) say when a task starts and ends and, in between, every
~5 % of its samples: done/total, samples/s over this run (resumed samples excluded) and ETA,
so a long run never looks hung.

    cm3eval: vqav2: start, 800 samples (120 already done)
    cm3eval: vqav2: 160/800 (20%) 3.41 samples/s ETA 3m08s
    cm3eval: vqav2: done, 800/800 in 3m20s (3.40 samples/s)
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

MODES = ("auto", "rich", "plain", "off")


def _tty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def resolve_mode(progress: bool | str | None) -> str:
    """None/"auto": rich when stdout and stderr are both terminals, plain lines otherwise (CI logs,
    `| tee`, `2> log`); True: rich; False: off. Either way it is drawn on stderr, so stdout
    carries only results (`--json`)."""
    if progress is True:
        return "rich"
    if progress is False:
        return "off"
    mode = progress or "auto"
    if mode not in MODES:
        raise ValueError(f"progress={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "rich" if _tty(sys.stdout) and _tty(sys.stderr) else "plain"
    return mode


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class PlainProgress:
    """Log lines at start, every `step` of the total, and at the end."""

    def __init__(self, total: int, done: int, label: str, stream: TextIO | None = None, step: float = 0.05) -> None:
        self.total, self.done, self.resumed, self.label = total, done, done, label
        self.stream = stream
        self.every = max(1, int(round(total * step)))
        self.t0 = time.monotonic()
        self._next = done + self.every

    def _say(self, text: str) -> None:
        s = self.stream or sys.stderr
        s.write(f"cm3eval: {self.label}: {text}\n")
        s.flush()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.resumed) / elapsed if elapsed > 0 else 0.0

    def __enter__(self) -> "PlainProgress":
        already = f" ({self.resumed} already done)" if self.resumed else ""
        self._say(f"start, {self.total} samples{already}")
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self._next and self.done < self.total:
            self._next = self.done + self.every
            rate = self.rate()
            eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
            pct = 100 * self.done // max(1, self.total)
            self._say(f"{self.done}/{self.total} ({pct}%) {rate:.2f} samples/s ETA {eta}")

    def __exit__(self, et: Any, e: Any, tb: Any) -> None:
        took = _clock(time.monotonic() - self.t0)
        if et is None:
            self._say(f"done, {self.done}/{self.total} in {took} ({self.rate():.2f} samples/s)")
        else:
            self._say(f"stopped at {self.done}/{self.total} after {took}")


class RichProgress:
    """A rich bar: description, bar, done/total, samples/s (this run only), ETA."""

    def __init__(self, total: int, done: int, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        class _Rate(TextColumn):
            def __init__(self) -> None:
                super().__init__("")

            def render(self, task: Any) -> Any:  # samples/s over this run only (resumed samples excluded)
                from rich.text import Text

                elapsed = task.elapsed or 0.0
                rate = (task.completed - task.fields.get("resumed", 0)) / elapsed if elapsed > 0 else 0.0
                return Text(f"{rate:.2f} samples/s")

        self._prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                              TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                              console=Console(stderr=True))
        self._args = (label, total, done)

    def __enter__(self) -> "RichProgress":
        self._prog.__enter__()
        label, total, done = self._args
        self._tid = self._prog.add_task(label, total=total, completed=done, resumed=done)
        return self

    def advance(self, n: int = 1) -> None:
        self._prog.advance(self._tid, n)

    def __exit__(self, *exc: Any) -> None:
        self._prog.__exit__(*exc)


class NoProgress:
    def __enter__(self) -> "NoProgress":
        return self

    def advance(self, n: int = 1) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def progress(mode: str, total: int, done: int, label: str) -> PlainProgress | RichProgress | NoProgress:
    if mode == "rich":
        return RichProgress(total, done, label)
    if mode == "plain":
        return PlainProgress(total, done, label)
    return NoProgress()
