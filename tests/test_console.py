"""What a run prints reads as one story: no Lightning product tips, no third-party deprecation warnings, a bar of
steps for a run bounded by steps, and the before/after table last."""

from __future__ import annotations

import lightning.pytorch as pl
from conftest import FAST, run_cli

from lightning_lora.callbacks import StepProgressBar

BAR = "━"  # rich's bar character: every progress line holds it


def test_the_console_of_a_short_run(tmp_path, tiny_bert, cache_dir) -> None:
    keep_bar = [o for o in FAST if o != "~callbacks.progress_bar"]
    proc = run_cli([f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *keep_bar,
                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    noise = ("litlogger", "Tip:", "DeprecationWarning", "FutureWarning", "is deprecated", "Epoch 0/-", "Epoch 1/-")
    assert not [n for n in noise if n in console], console
    lines = proc.stdout.rstrip().splitlines()
    steps = [line for line in lines if line.startswith("Steps") and BAR in line]
    assert len(steps) == 1 and "4/4" in steps[0], steps  # one bar for the run: optimizer steps out of max_steps
    table = lines.index(next(line for line in lines if line.startswith("metric") and "before" in line))
    assert table > max(i for i, line in enumerate(lines) if BAR in line)  # after the last progress line
    assert lines[table:][-1].startswith("val/ndcg@10") and len(lines) - table == 6  # and the last thing printed


def test_the_bar_counts_steps_only_when_steps_bound_the_run() -> None:
    assert StepProgressBar.counts_steps(pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False))
    assert not StepProgressBar.counts_steps(pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False))
    assert not StepProgressBar.counts_steps(pl.Trainer(max_steps=5, max_epochs=2, logger=False,
                                                       enable_checkpointing=False))



def test_the_bar_redraws_at_most_refresh_rate_times_a_second_and_always_at_the_end(monkeypatch) -> None:
    bar = StepProgressBar(refresh_rate=1)  # at most once a second: the batches below come much faster
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, callbacks=[bar])
    monkeypatch.setattr(pl.Trainer, "num_training_batches", property(lambda self: 100))  # no data in this test
    assert bar._redraw_due(trainer, 0)  # the first batch draws
    assert not bar._redraw_due(trainer, 1)  # the next one, a moment later, does not
    assert bar._redraw_due(trainer, 99)  # the epoch's last batch always draws
