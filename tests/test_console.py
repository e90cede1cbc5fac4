"""bonefrac.console: the progress callback, and Lightning's banners kept off the terminal."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bonefrac.console import LIGHTNING_CHATTER, progress, third_party_output


def test_progress_is_a_done_total_callback_whose_finished_bar_is_one_line(capsys):
    with progress("scanning") as update:
        update(1, 4)
        update(4, 4)
    bar = capsys.readouterr().err.splitlines()
    assert len(bar) == 1 and bar[0].startswith("scanning") and "4/4" in bar[0]
    with progress("scanning", enabled=False) as update:
        assert update is None
    assert capsys.readouterr() == ("", "")
    with progress("decoding into the cache"):
        pass  # everything was cached: nothing to show, not a "0/?" bar
    assert capsys.readouterr() == ("", "")


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_output_keeps_lightnings_banners_out_unless_verbose(verbose, capfd, caplog):
    levels = [logging.getLogger(name).level for name in LIGHTNING_CHATTER]
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    with third_party_output(verbose):
        trainer = pl.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=verbose,
        )
        trainer.fit(Tiny(), data)
    out, err = capfd.readouterr()
    # Under pytest Lightning's records reach the root logger (caplog); from the command line, its own stderr handler.
    printed = out + err + caplog.text
    if verbose:
        assert "GPU available" in printed and "TPU available" in printed and "LitLogger" in printed
    else:
        for banner in ("GPU available", "TPU available", "litlogger", "LitLogger", "FLOPs", "max_epochs=1"):
            assert banner not in printed
    assert [logging.getLogger(name).level for name in LIGHTNING_CHATTER] == levels
