"""How often a run evaluates and writes last.pt (eval_every, eval_every_min, save_every_min), the
background checkpoint writer, and the time split a run reports (setup, train, eval, checkpoint
seconds) in its events and through the job store's progress.

Runs are tiny (img_size 32, one step per epoch, the small cut of the sample): they check when
things happen, not learning.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from core_fixtures import TINY, small_sample

from app.progress import JobProgress
from faceid.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from faceid.config import TrainConfig
from faceid.train import run

SPLIT = ("setup_s", "train_s", "eval_s", "checkpoint_s", "wall_s")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    train, val = small_sample(tmp_path_factory)
    return {"train": str(train), "val": str(val)}


def _run(folders: dict[str, str], ckpt_dir: Path, stop: threading.Event | None = None, on_event=None, **cfg: Any):
    config = TrainConfig(
        **folders,
        ckpt_dir=str(ckpt_dir),
        train_mode="arcface",
        **{**TINY, "max_steps_per_epoch": 1, **cfg},
    )
    events: list[dict[str, Any]] = []

    def sink(e: dict[str, Any]) -> None:
        events.append(e)
        if on_event is not None:
            on_event(e)

    result = run(config, on_event=sink, stop=stop)
    return result, events


def _epochs(events: list[dict[str, Any]], event: str = "epoch", **match: Any) -> list[int]:
    return [e["epoch"] for e in events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _metrics_epochs(ckpt_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_epoch_is_evaluated_and_saved_by_default(folders, tmp_path):
    _, events = _run(folders, tmp_path, epochs=3)
    assert _epochs(events) == [1, 2, 3] == _metrics_epochs(tmp_path)
    assert _epochs(events, "checkpoint", kind="last") == [1, 2, 3]


def test_eval_every_evaluates_every_nth_epoch_and_always_the_last(folders, tmp_path):
    result, events = _run(folders, tmp_path, epochs=5, eval_every=2)
    assert _epochs(events) == [2, 4, 5] == _metrics_epochs(tmp_path)
    assert [h["epoch"] for h in result.history] == [2, 4, 5]
    # last.pt goes with the evaluations, and the run's last.pt is the last epoch's
    assert _epochs(events, "checkpoint", kind="last") == [2, 4, 5]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 5
    assert result.best_epoch in (2, 4, 5) and (tmp_path / "backbone_best.pt").is_file()


def test_eval_every_min_waits_and_a_run_shorter_than_it_is_evaluated_once_at_the_end(folders, tmp_path):
    _, events = _run(folders, tmp_path, epochs=3, eval_every_min=60)
    assert _epochs(events) == [3]
    assert _epochs(events, "checkpoint", kind="best") == [3]


def test_save_every_min_writes_last_pt_only_when_due_and_at_the_end(folders, tmp_path):
    _, events = _run(folders, tmp_path, epochs=3, save_every_min=60)
    assert _epochs(events) == [1, 2, 3]
    assert _epochs(events, "checkpoint", kind="last") == [3]


def test_a_stop_is_evaluated_and_saved_whatever_the_cadence(folders, tmp_path):
    stop = threading.Event()

    def stop_in_epoch_2(e: dict[str, Any]) -> None:
        if e["event"] == "progress" and e["epoch"] == 2:  # after its first step: the second sees it
            stop.set()

    result, events = _run(
        folders,
        tmp_path,
        stop,
        stop_in_epoch_2,
        epochs=6,
        max_steps_per_epoch=2,
        eval_every=10,
        eval_every_min=60,
        save_every_min=60,
    )
    assert result.stopped_early
    assert _epochs(events) == [2]
    assert _epochs(events, "checkpoint", kind="last") == [2]
    # a resume goes on after the stopped epoch
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_the_time_split_adds_up_and_reaches_the_job_progress(folders, tmp_path):
    # two steps an epoch: the process's first step counts as setup, the second as training
    _, events = _run(folders, tmp_path, epochs=2, max_steps_per_epoch=2)
    epochs = [e for e in events if e["event"] == "epoch"]
    fin = events[-1]
    assert fin["event"] == "finished"
    for e in [*epochs, fin]:
        assert all(isinstance(e[k], float) and e[k] >= 0 for k in SPLIT), e
        parts = e["setup_s"] + e["train_s"] + e["eval_s"] + e["checkpoint_s"]
        assert parts <= e["wall_s"] + 0.05  # each part rounded to 0.01 s
        assert e["train_s"] > 0 and e["eval_s"] > 0 and e["setup_s"] > 0
    # cumulative: each record's figures are at least the previous one's
    for a, b in zip(epochs, [*epochs[1:], fin]):
        assert all(b[k] >= a[k] for k in SPLIT)
    assert epochs[1]["eval_s"] > epochs[0]["eval_s"]
    # every checkpoint event names a file that was in place when it was sent
    assert all(Path(e["path"]).is_file() for e in events if e["event"] == "checkpoint")

    progress = JobProgress(best_metric="acc")
    for e in events:
        progress.apply(e)
    split = progress.columns()["progress"]["time_split"]
    assert split == {k: fin[k] for k in SPLIT}


def test_the_job_progress_keeps_the_last_split_through_later_progress_events():
    progress = JobProgress(best_metric="acc")
    progress.apply({"event": "start", "epochs": 2, "steps_per_epoch": 1, "device": "cpu", "amp": "off"})
    record = {"event": "epoch", "epoch": 1, "global_step": 1, "train_loss": 1.0, "lr": 0.1, "acc": 0.5,
              "th": 0.1, "auc": 0.5, "tar_1e-2": 0.0, "tar_1e-3": 0.0, "th_far_1e-2": 0.2, "th_far_1e-3": 0.3,
              "best_epoch": 1, "best_value": 0.5, "setup_s": 1.0, "train_s": 2.0, "eval_s": 0.5,
              "checkpoint_s": 0.1, "wall_s": 3.7}  # fmt: skip
    progress.apply(record)
    progress.apply({"event": "progress", "epoch": 2, "epochs": 2, "step": 1, "steps": 1, "percent": 75.0,
                    "loss": 1.0, "images_per_s": 10.0, "lr": 0.1, "eta_s": 1.0})  # fmt: skip
    p = progress.columns()["progress"]
    assert p["percent"] == 75.0 and p["time_split"]["train_s"] == 2.0 and p["time_split"]["wall_s"] == 3.7
    # a trainer that does not report the split leaves none
    quiet = JobProgress(best_metric="acc")
    quiet.apply({k: v for k, v in record.items() if not k.endswith("_s")})
    assert "time_split" not in (quiet.columns()["progress"] or {})


# --- the background writer ------------------------------------------------------------------


def assert_(ok: bool) -> None:
    assert ok


def test_the_writer_saves_what_was_submitted_not_what_training_changed_since(tmp_path):
    writer = CheckpointWriter()
    weights = torch.zeros(1000)
    seen: list[bool] = []
    writer.submit({"w": weights, "nested": [{"w": weights}]}, tmp_path / "a.pt", lambda: seen.append(True))
    weights += 1  # the next training step, while the file may still be written
    writer.wait()
    saved = torch.load(tmp_path / "a.pt")
    assert seen == [True]
    assert saved["w"].sum() == 0 and saved["nested"][0]["w"].sum() == 0
    writer.close()


def test_after_a_failed_write_nothing_more_is_written_and_the_trainer_hears_of_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    writer = CheckpointWriter()
    done: list[str] = []
    gate = threading.Event()
    writer.then(lambda: assert_(gate.wait(10)))  # holds the writer until everything is queued
    writer.submit({"w": torch.ones(2)}, tmp_path / "file" / "x.pt", lambda: done.append("x"))
    writer.submit({"w": torch.ones(2)}, tmp_path / "after.pt", lambda: done.append("after"))
    writer.then(lambda: done.append("record"))
    gate.set()
    with pytest.raises(OSError):
        writer.wait()
    # as a synchronous run would have stopped at the failed write: neither the later file nor the
    # epoch record that waited for it, and every later call raises the same error
    assert done == [] and not (tmp_path / "after.pt").exists()
    with pytest.raises(OSError):
        writer.check()
    with pytest.raises(OSError):
        writer.submit({"w": torch.ones(2)}, tmp_path / "later.pt")
    writer.close()


def test_a_second_write_of_a_file_waits_for_the_first(tmp_path, monkeypatch):
    order: list[str] = []
    release = threading.Event()

    def slow_save(obj: dict[str, Any], path: Path) -> Path:
        order.append(f"start {obj['n']}")
        if obj["n"] == 1:
            assert release.wait(10)
        save_checkpoint(obj, path)
        order.append(f"end {obj['n']}")
        return path

    monkeypatch.setattr("faceid.checkpoint.save_checkpoint", slow_save)
    writer = CheckpointWriter()
    writer.submit({"n": 1}, tmp_path / "last.pt")
    submitted = threading.Event()
    second = threading.Thread(target=lambda: (writer.submit({"n": 2}, tmp_path / "last.pt"), submitted.set()))
    second.start()
    assert not submitted.wait(0.3)  # held: only one copy of a file waits to be written
    release.set()
    second.join(10)
    writer.wait()
    assert order == ["start 1", "end 1", "start 2", "end 2"]
    assert torch.load(tmp_path / "last.pt")["n"] == 2
    writer.close()
