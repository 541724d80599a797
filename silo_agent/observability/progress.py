"""Local training progress on the silo operator's terminal.

Rule: a display only. The runner wraps a round's local training in `training_progress(round_id)`
and hands the callback it yields to the task as ``params["progress"]``; the task calls it as
``progress(done, total)`` (steps, batches or epochs: the task's choice) whenever it likes, or
never. On a terminal (stderr is a TTY and `--log-format` is not json; `cmd_run` decides, through
`configure`) a rich progress bar shows ``round N · local training`` with done/total and elapsed
time and disappears when the round's training ends; otherwise the callback does nothing, so a
task behaves the same with or without a terminal.

    progress = TrainingProgress(enabled=True)
    with progress.round(7) as tick:
        for step in range(10):
            ...
            tick(step + 1, 10)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

ProgressCallback = Callable[[int, int], None]


def _ignore(done: int, total: int) -> None:
    del done, total


class TrainingProgress:
    """Shows one bar per round of local training when `enabled`; otherwise does nothing."""

    def __init__(self, *, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self._console = console

    @contextmanager
    def round(self, round_id: int, total: int | None = None) -> Iterator[ProgressCallback]:
        """Yield the task's callback `tick(done, total)` for this round's training."""
        if not self.enabled:
            yield _ignore
            return
        bar = Progress(
            TextColumn(f"round {round_id} · local training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console or Console(stderr=True),
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        task = bar.add_task("train", total=total)

        def tick(done: int, total: int) -> None:
            # A task may report anything; a display must never break training.
            try:
                done_f, total_f = float(done), float(total)
            except (TypeError, ValueError):
                return
            if math.isfinite(done_f) and math.isfinite(total_f) and total_f > 0:
                bar.update(task, completed=min(done_f, total_f), total=total_f)

        with bar:
            yield tick


_default = TrainingProgress(enabled=False)


def configure(*, enabled: bool, console: Console | None = None) -> None:
    """Called by `cmd_run` at start: whether `training_progress` shows a bar."""
    global _default
    _default = TrainingProgress(enabled=enabled, console=console)


def training_progress(
    round_id: int, total: int | None = None
) -> AbstractContextManager[ProgressCallback]:
    """The runner's hook: `with training_progress(round_id) as tick:` (a no-op unless on)."""
    return _default.round(round_id, total)
