"""Progress bars for long jobs (rich, on stderr, with the time remaining), silent when asked or when nothing
reads stderr."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def track(items: Iterable, description: str, enabled: bool = True, total: int | None = None) -> Iterator:
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:     # stdout stays for results
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
