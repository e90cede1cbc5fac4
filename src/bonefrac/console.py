"""Where bonefrac's terminal output goes: results on stdout (`console`), errors, warnings and progress on stderr
(`status`), and how much of the libraries underneath reaches either.

    from bonefrac.console import console, progress, status, third_party_output
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# soft_wrap: rich never breaks a line of text itself. Off a terminal rich would wrap at 80 columns (or $COLUMNS), so
# in a pipe or a log "…/nowhere: not a folder" became two lines that grep cannot find; on a terminal the terminal
# wraps, and a long path stays one line to copy. Tables and rules still fit the width; their titles do not wrap.
console = Console(soft_wrap=True)
status = Console(stderr=True, soft_wrap=True)

# Lightning's info lines that `bonefrac train` repeats in its own words or does not need. Every rank_zero_info goes
# to the first logger: "GPU available: False, used: False", "TPU available: …" (Trainer() construction), the
# "💡 Tip: … litlogger … LitLogger" (Trainer() with any logger but LitLogger), "`Trainer.fit` stopped: `max_epochs=…`
# reached", "Restoring states from the checkpoint …". The second says "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]" on
# a GPU. The model summary table (with "Total FLOPs: 0") is no log record: Trainer(enable_model_summary=False).
LIGHTNING_CHATTER = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


@contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr as the `progress(done, total)` callback library functions take; None if not enabled.

    The finished bar stays: on a terminal it shows what was done, in a log it is one line with the count. A bar
    that is never updated (the work was found in a cache) is never shown: no "0/?" line for nothing done.
    """
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=status)
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # the bar starts with the first piece of work
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@contextmanager
def third_party_output(verbose: bool) -> Iterator[None]:
    """Unless verbose, Lightning's banners and tips (LIGHTNING_CHATTER) are dropped until the block ends.

    Dropped, not redirected: they reach no handler, run.log's included (summary.json names the device). Warnings
    still show. Wrap the Trainer's construction as well as `fit`: the banners are printed by `Trainer()`.
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in LIGHTNING_CHATTER]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
