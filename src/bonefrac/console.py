"""Where bonefrac's terminal output goes: results on stdout (`console`), errors, warnings and progress on stderr
(`status`).

    from bonefrac.console import console, progress, status
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# soft_wrap: rich never breaks a line of text itself. Off a terminal rich would wrap at 80 columns (or $COLUMNS), so
# in a pipe or a log "…/nowhere: not a folder" became two lines that grep cannot find; on a terminal the terminal
# wraps, and a long path stays one line to copy. Tables and rules still fit the width; their titles do not wrap.
console = Console(soft_wrap=True)
status = Console(stderr=True, soft_wrap=True)


@contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr as the `progress(done, total)` callback library functions take; None if not enabled.

    The finished bar stays: on a terminal it shows what was done, in a log it is one line with the count.
    """
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=status) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)

