"""bonefrac.console: the progress callback."""

from __future__ import annotations

from bonefrac.console import progress


def test_progress_is_a_done_total_callback_whose_finished_bar_is_one_line(capsys):
    with progress("scanning") as update:
        update(1, 4)
        update(4, 4)
    bar = capsys.readouterr().err.splitlines()
    assert len(bar) == 1 and bar[0].startswith("scanning") and "4/4" in bar[0]
    with progress("scanning", enabled=False) as update:
        assert update is None
    assert capsys.readouterr() == ("", "")

