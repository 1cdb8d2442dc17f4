"""RunLogger: metrics.csv beside the TensorBoard events, continued by a resumed fit."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vitlora.training.logging import RunLogger


def test_metrics_csv_holds_every_logged_row(tmp_path):
    logger = RunLogger(str(tmp_path), name="run", version="0")
    logger.log_metrics({"train/loss": 1.5}, step=2)
    logger.log_metrics({"val/top1": 0.5, "epoch": 0.0}, step=5)
    logger.save()
    rows = list(csv.DictReader((tmp_path / "run" / "0" / "metrics.csv").open()))
    assert rows == [
        {"step": "2", "train/loss": "1.5", "val/top1": "", "epoch": ""},
        {"step": "5", "train/loss": "", "val/top1": "0.5", "epoch": "0.0"},
    ]


def test_a_resumed_fit_keeps_the_rows_from_before_its_checkpoint(tmp_path):
    """Lightning logs a batch's metrics at the step count before its optimizer step: a checkpoint of
    step 8 covers the rows logged at steps up to 7; the killed run's row at step 8 (batch 9) is logged
    again by the resumed one, so it is not kept."""
    killed = RunLogger(str(tmp_path), name="run", version="0")
    for step in (2, 5, 7, 8):
        killed.log_metrics({"train/loss": float(step)}, step=step)
    killed.save()
    resumed = RunLogger(str(tmp_path), name="run", version="0")
    resumed.continue_at(8)
    resumed.log_metrics({"train/loss": 80.0}, step=8)
    assert resumed.rows == [{"step": s, "train/loss": float(s)} for s in (2, 5, 7)] + [{"step": 8, "train/loss": 80.0}]
    RunLogger(str(tmp_path), name="fresh", version="0").continue_at(8)  # nothing to keep: no error


@pytest.mark.parametrize("writer_open", [False, True], ids=["writer-not-yet-open", "writer-already-open"])
def test_a_resumed_fit_replaces_the_interrupted_runs_later_tensorboard_events(tmp_path, writer_open):
    killed = RunLogger(str(tmp_path), name="run", version="0")
    for step in (2, 5, 7, 8, 9):
        killed.log_metrics({"train/loss": float(step)}, step=step)
    killed.finalize("success")
    folder = tmp_path / "run" / "0"
    prefix = "events.out.tfevents."  # then the time in 10 digits: files are read in name order
    for events in folder.glob(prefix + "*"):  # dated earlier, as a killed process's file is
        events.rename(folder / (prefix + "0000000001" + events.name[len(prefix) + 10 :]))
    resumed = RunLogger(str(tmp_path), name="run", version="0")
    if writer_open:
        assert resumed.experiment is not None and resumed._experiment is not None
    resumed.continue_at(8)
    assert "purge_step" not in resumed._kwargs  # a later writer of this logger does not purge again
    for step in (8, 9, 10):
        resumed.log_metrics({"train/loss": 10.0 * step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(folder))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert logged == [(2, 2.0), (5, 5.0), (7, 7.0), (8, 80.0), (9, 90.0), (10, 100.0)]
