"""The fake trainer speaks the events contract: every line it writes, in each of its modes, is an
event `faceid.events.parse_event` accepts, with no field the contract does not name. The service
tests rely on it standing in for `python -m faceid.train`; this keeps it from drifting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_helpers import FAKE_TRAINER, MODE

from faceid.events import Checkpoint, EpochEnd, Failed, Finished, Progress, Start, parse_event


def _config(folder: Path, **changes) -> Path:
    cfg = {"seed": MODE.OK, "ckpt_dir": str(folder), "img_size": 32, "epochs": 2, "best_metric": "acc", **changes}
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _command(folder: Path, config: Path) -> list[str]:
    return [sys.executable, str(FAKE_TRAINER), "--config", str(config), "--events_file", str(folder / "events.jsonl")]


def _events(folder: Path) -> list:
    lines = (folder / "events.jsonl").read_text().splitlines()
    assert lines and all(lines), lines
    events = [parse_event(json.loads(line)) for line in lines]  # raises on anything off the contract
    for ev in events:
        assert not ev.model_extra, f"{ev.event}: fields the contract does not name: {sorted(ev.model_extra)}"
    return events


def _run(folder: Path, **changes) -> tuple[int, list]:
    proc = subprocess.run(
        _command(folder, _config(folder, **changes)),
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )
    return proc.returncode, _events(folder)


def test_a_run_and_its_resume(tmp_path):
    rc, events = _run(tmp_path)
    assert rc == 0
    assert [type(ev) for ev in events[:2]] == [Start, Progress] and isinstance(events[-1], Finished)
    assert {type(ev) for ev in events} == {Start, Progress, EpochEnd, Checkpoint, Finished}
    assert [ev.epoch for ev in events if isinstance(ev, EpochEnd)] == [1, 2]
    assert {ev.kind for ev in events if isinstance(ev, Checkpoint)} == {"best", "last"}
    (tmp_path / "events.jsonl").unlink()
    rc, events = _run(tmp_path, epochs=3, resume=str(tmp_path / "last.pt"))
    assert rc == 0 and [ev.epoch for ev in events if isinstance(ev, EpochEnd)] == [3]


@pytest.mark.parametrize(
    "mode,rc,last",
    [
        (MODE.DATA_ERROR, 2, Failed),
        (MODE.NO_CHECKPOINT, 0, Finished),
        (MODE.KILLED, -signal.SIGKILL, Progress),
        (MODE.DIE_AFTER_EPOCH, -signal.SIGKILL, Checkpoint),
    ],
)
def test_each_failure_mode(tmp_path, mode, rc, last):
    code, events = _run(tmp_path, seed=mode)
    assert code == rc and isinstance(events[-1], last)
    if mode == MODE.DATA_ERROR:
        assert events[-1].kind == "data"


def test_a_base_model_that_is_missing(tmp_path):
    rc, events = _run(tmp_path, init_from=str(tmp_path / "nowhere.pt"))
    assert rc == 2 and len(events) == 1 and isinstance(events[0], Failed) and events[0].kind == "config"


def test_stopped_by_sigterm(tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, _config(tmp_path, seed=MODE.SLOW)),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        events_file = tmp_path / "events.jsonl"
        deadline = time.monotonic() + 30
        while not (events_file.exists() and '"progress"' in events_file.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its grandchild too
        except ProcessLookupError:
            pass
        proc.wait()
    events = _events(tmp_path)
    assert [type(ev) for ev in events[-3:]] == [EpochEnd, Checkpoint, Failed]
    assert events[-1].kind == "cancelled"
