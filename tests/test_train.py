"""End to end: training on the shipped LFW sample through `faceid.train.run` (in-process) and the
`faceid train` / `python -m faceid.train` command (a child process), its artifacts and events,
resume, SIGTERM, bad-data errors, and the evaluate / embed / verify commands on the result.

Runs are tiny (img_size 32, 2 steps, 200 evaluation pairs): they check the plumbing, not learning.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from core_fixtures import (
    METRIC_KEYS,
    SAMPLE_PAIRS,
    SAMPLE_TRAIN,
    SAMPLE_VAL,
    TINY,
    faceid_cmd,
    make_identity_folder,
    sample_images,
    small_sample,
    subprocess_env,
    tiny_arcface_run,
    tiny_flags,
)

from faceid import cli
from faceid.checkpoint import FORMAT, load_checkpoint
from faceid.config import TrainConfig

DATA = ["--train", str(SAMPLE_TRAIN), "--val", str(SAMPLE_VAL)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    """arcface, in-process, with the sample's pairs file (shared with test_inference)."""
    return tiny_arcface_run(tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """--train/--val flags of a small cut of the sample (6 + 4 people), for runs that do not need
    the whole sample: evaluation is most of a tiny run's time."""
    train, val = small_sample(tmp_path_factory)
    return ["--train", str(train), "--val", str(val)]


@pytest.fixture(scope="module")
def pair_cli(tmp_path_factory, small):
    """pair mode through the `faceid train` command in a child process."""
    d = tmp_path_factory.mktemp("pair_cli")
    events = d / "job" / "events.jsonl"  # its folder does not exist yet
    cmd = faceid_cmd(
        "train",
        *small,
        "--ckpt_dir",
        str(d / "models"),
        "--train_mode",
        "pair",
        "--epochs",
        "1",
        "--pairs_per_epoch",
        "64",
        "--events_file",
        str(events),
        *tiny_flags(),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    return proc, d / "models", events


# --- artifacts ----------------------------------------------------------------------------------


def test_cli_run_succeeds(pair_cli):
    proc, models, _ = pair_cli
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # plain progress lines in a log (not a terminal): step, loss, images/s, lr, ETA
    assert "epoch 1/1 step 2/2 loss" in proc.stderr and "img/s" in proc.stderr and "ETA" in proc.stderr


def _check_artifacts(ckpt_dir: Path, train_mode: str, with_pairs: bool) -> None:
    for name in ("backbone_best.pt", "last.pt", "metrics.jsonl", "config.json"):
        assert (ckpt_dir / name).is_file(), name
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]

    records = read_jsonl(ckpt_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]
    for r in records:
        for k in METRIC_KEYS:
            assert k in r, k
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert -1.0 <= r["th"] <= 1.0
        for k in ("acc", "auc", "tar_1e-2", "tar_1e-3"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["acc"] >= 0.5  # the accuracy at the best threshold is never below chance
        for k in ("th_far_1e-2", "th_far_1e-3"):
            assert -1.0 <= r[k] <= 1.0
        assert ("pairs_acc" in r) == with_pairs
        if with_pairs:
            for k in ("pairs_acc", "pairs_auc"):
                assert 0.0 <= r[k] <= 1.0, k
            assert r["pairs_acc_std"] >= 0 and -1.0 <= r["pairs_th"] <= 1.0
            assert r["pairs_n"] == 200

    cfg = TrainConfig(**json.loads((ckpt_dir / "config.json").read_text()))
    assert cfg.train_mode == train_mode and cfg.img_size == 32

    best = load_checkpoint(ckpt_dir / "backbone_best.pt")
    assert best["format"] == FORMAT and best["epoch"] == 1 and best["img_size"] == 32
    assert best["embedding_size"] == cfg.embedding_size
    assert best["config"] == cfg.to_json_dict()
    assert best["metrics"]["acc"] == records[0]["acc"]
    assert best["thresholds"]["acc"] == pytest.approx(records[0]["th"])
    assert set(best["thresholds"]) >= {"acc", "far_1e-2", "far_1e-3"}
    assert "optimizer" not in best  # the best model is weights only, not resumable

    last = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == TINY["max_steps_per_epoch"]
    assert [h["epoch"] for h in last["history"]] == [1]
    assert last["best"] == {"epoch": 1, "value": records[0]["acc"], "metric": "acc"}
    assert {"optimizer", "scheduler", "head", "model"} <= set(last)
    if train_mode == "pair":
        assert last["head"] is None
    else:  # the ArcMarginProduct state_dict: one centre per training identity
        assert set(last["head"]) == {"weight"}
        assert last["head"]["weight"].shape == (40, cfg.embedding_size)


def test_cli_pair_artifacts(pair_cli):
    _check_artifacts(pair_cli[1], "pair", with_pairs=False)


def test_inprocess_arcface_artifacts(arc):
    _check_artifacts(arc.ckpt_dir, "arcface", with_pairs=True)
    assert json.loads((arc.ckpt_dir / "config.json").read_text()) == arc.cfg.to_json_dict()
    r = arc.result
    assert r.best_epoch == 1 and r.best_metric == "acc" and not r.stopped_early
    assert r.best_checkpoint == str(arc.best)
    assert set(r.thresholds) >= {"acc", "far_1e-2", "far_1e-3", "pairs_acc"}
    # roc.json: the best epoch's curve on the sampled validation pairs, with its operating points
    roc = json.loads((arc.ckpt_dir / "roc.json").read_text())
    best = [json.loads(line) for line in (arc.ckpt_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert roc["epoch"] == 1 and roc["thresholds"] == r.thresholds
    assert (roc["n_pos"], roc["n_neg"]) == (best["n_pos"], best["n_neg"])
    assert roc["far"][0] <= roc["far"][-1] == 1.0 and len(roc["far"]) == len(roc["tar"]) == len(roc["threshold"])
    far_1e2 = max(t for f, t in zip(roc["far"], roc["tar"]) if f <= 1e-2)
    assert far_1e2 == pytest.approx(best["tar_1e-2"])


# --- events -------------------------------------------------------------------------------------


def _check_events(events: list[dict[str, Any]]) -> None:
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finished", kinds
    assert {"progress", "epoch", "checkpoint"} <= set(kinds)
    first_ck = kinds.index("checkpoint")
    assert max(i for i, k in enumerate(kinds) if k == "progress") < first_ck  # one epoch here
    assert kinds.index("epoch") < kinds.index("finished")
    times = [e["time"] for e in events]
    assert times == sorted(times)

    start = events[0]
    for k in ("epochs", "steps_per_epoch", "device", "amp", "world_size", "config"):
        assert k in start, k
    assert start["device"] == "cpu" and start["world_size"] == 1 and start["steps_per_epoch"] == 2

    progress = [e for e in events if e["event"] == "progress"]
    pct = [e["percent"] for e in progress]
    assert pct == sorted(pct) and len(set(pct)) == len(pct) and pct[-1] == 100.0 and pct[0] > 0
    for e in progress:
        for k in ("epoch", "epochs", "step", "steps", "loss", "images_per_s", "lr", "eta_s"):
            assert k in e, k
        assert 1 <= e["step"] <= e["steps"] and e["eta_s"] >= 0 and e["images_per_s"] > 0

    cks = [e for e in events if e["event"] == "checkpoint"]
    assert {e["kind"] for e in cks} == {"best", "last"}
    for e in cks:
        assert Path(e["path"]).is_file() and e["epoch"] == 1

    ep = next(e for e in events if e["event"] == "epoch")
    for k in (
        "train_loss",
        "lr",
        "acc",
        "th",
        "auc",
        "tar_1e-2",
        "tar_1e-3",
        "th_far_1e-2",
        "th_far_1e-3",
        "is_best",
        "best_epoch",
        "best_value",
        "epoch_time_s",
        "setup_s",
        "train_s",
        "eval_s",
        "checkpoint_s",
        "wall_s",
    ):
        assert k in ep, k

    fin = events[-1]
    assert fin["best_epoch"] == 1 and fin["best_metric"] == "acc"
    assert fin["wall_s"] >= fin["train_s"] + fin["eval_s"] > 0 and fin["eval_s"] >= ep["eval_s"] > 0
    assert Path(fin["best_checkpoint"]).is_file()
    assert fin["thresholds"]["acc"] == pytest.approx(ep["th"])


def test_cli_events_file(pair_cli):
    _, _, events_file = pair_cli
    events = read_jsonl(events_file)
    _check_events(events)
    assert events[0]["config"]["train_mode"] == "pair"


def test_inprocess_events(arc):
    _check_events(arc.events)
    ep = next(e for e in arc.events if e["event"] == "epoch")
    assert "pairs_acc" in ep and "pairs_auc" in ep


# --- SIGTERM, then resume -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, small):
    """An arcface run of 2 epochs through the service's command line (`python -m faceid.train`),
    sent SIGTERM after its first progress event. Returns (returncode, stderr, ckpt_dir, events)."""
    d = tmp_path_factory.mktemp("sigterm")
    models, events = d / "models", d / "events.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "faceid.train",
        *small,
        "--ckpt_dir",
        str(models),
        "--train_mode",
        "arcface",
        "--epochs",
        "2",
        "--events_file",
        str(events),
        *tiny_flags(max_steps_per_epoch=4, progress_step_pct=1),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if events.exists() and '"event": "progress"' in events.read_text():
                break  # (a text check: the last line may still be half written)
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, models, events


def test_sigterm_stops_saves_last_and_exits_143(stopped):
    rc, err, models, events = stopped
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err and "stopping after this step" in err
    evs = read_jsonl(events)
    assert evs[-1]["event"] == "failed" and evs[-1]["kind"] == "cancelled"
    assert "last.pt" in evs[-1]["error"]
    fin = next(e for e in evs if e["event"] == "finished")
    assert fin["stopped_early"] is True
    progress = [e for e in evs if e["event"] == "progress"]
    done = progress[-1]["step"]
    assert {e["epoch"] for e in progress} == {1} and done < 4  # stopped mid-epoch
    last = load_checkpoint(models / "last.pt")
    # the weights are epoch 1's after `done` of its 4 steps, and last.pt says so
    assert (last["epoch"], last["partial_steps"], last["global_step"]) == (1, done, done)
    records = read_jsonl(models / "metrics.jsonl")
    assert [(r["epoch"], r["complete"], r["epoch_steps"]) for r in records] == [(1, False, done)]
    assert f"stopped after {done} of its 4 steps" in err


@pytest.fixture
def resumable(stopped, tmp_path):
    """A copy of the stopped run's ckpt_dir (epoch 1 of 2 stopped part way), safe to write into."""
    d = tmp_path / "models"
    shutil.copytree(stopped[2], d)
    return d


def test_resume_trains_the_rest_of_the_stopped_epoch_then_the_next(resumable, small, capsys):
    """The resumed run ends with as many steps as one never stopped: the stopped epoch's other
    steps (the same batches, in order), then epoch 2; the stopped epoch keeps both its records."""
    events = resumable / "events.jsonl"
    before = load_checkpoint(resumable / "last.pt")
    done = before["partial_steps"]
    assert 0 < done < 4
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--resume",
            str(resumable / "last.pt"),
            "--epochs",
            "2",
            "--events_file",
            str(events),
            "--quiet",
            *tiny_flags(max_steps_per_epoch=4),
        ]
    )
    assert rc == 0, capsys.readouterr().err

    records = read_jsonl(resumable / "metrics.jsonl")
    assert [(r["epoch"], r["complete"], r["epoch_steps"]) for r in records] == [
        (1, False, done),
        (1, True, 4),
        (2, True, 4),
    ]
    last = load_checkpoint(resumable / "last.pt")
    assert (last["epoch"], last["partial_steps"]) == (2, 0)
    assert [h["epoch"] for h in last["history"]] == [1, 1, 2]
    assert last["history"][0] == before["history"][0]
    assert last["global_step"] == 8  # 2 epochs of 4 steps, as if never stopped
    assert last["scheduler"]["last_epoch"] == last["global_step"]  # the schedule went on, too
    resumed = read_jsonl(events)
    assert resumed[0]["event"] == "start" and resumed[0]["start_epoch"] == 1
    steps = [(e["epoch"], e["step"]) for e in resumed if e["event"] == "progress"]
    assert steps[0][0] == 1 and steps[0][1] > done and steps[-1] == (2, 4)
    pct = [e["percent"] for e in resumed if e["event"] == "progress"]
    assert pct[0] > 100 * done / 8 and pct[-1] == 100.0
    assert resumed[-1]["event"] == "finished"


def test_resume_with_other_batches_goes_on_with_the_next_epoch(resumable, small, capsys):
    """Another step cap (or batch size, or process count) makes other batches: the stopped epoch's
    remaining steps are unknown, so it counts as done and the next epoch follows."""
    done = load_checkpoint(resumable / "last.pt")["partial_steps"]
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--resume",
            str(resumable / "last.pt"),
            "--epochs",
            "2",
            "--quiet",
            *tiny_flags(max_steps_per_epoch=3),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    records = read_jsonl(resumable / "metrics.jsonl")
    assert [(r["epoch"], r["complete"], r["epoch_steps"]) for r in records] == [(1, False, done), (2, True, 3)]


def test_resume_with_another_best_metric_is_a_user_error(resumable, small, capsys):
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--best_metric",
            "auc",
            "--resume",
            str(resumable / "last.pt"),
            "--epochs",
            "2",
            "--quiet",
            *tiny_flags(),
        ]
    )
    line = _one_line_error(rc, capsys.readouterr().err)
    assert "chosen by best_metric='acc'" in line and "resume with --best_metric acc" in line


def test_resume_into_another_folder_brings_the_best_checkpoint(resumable, small, tmp_path, capsys):
    flags = [
        "train",
        *small,
        "--train_mode",
        "arcface",
        "--resume",
        str(resumable / "last.pt"),
        "--epochs",
        "2",
        "--quiet",
        *tiny_flags(max_steps_per_epoch=4),
    ]
    assert cli.main([*flags, "--ckpt_dir", str(resumable)]) == 0, capsys.readouterr().err  # run to its end
    elsewhere = tmp_path / "elsewhere"
    # nothing left to train: the folder's backbone_best.pt can only be the one brought along
    assert cli.main([*flags, "--ckpt_dir", str(elsewhere)]) == 0, capsys.readouterr().err
    assert (elsewhere / "backbone_best.pt").read_bytes() == (resumable / "backbone_best.pt").read_bytes()
    assert (elsewhere / "config.json").exists()


def test_a_refused_run_leaves_the_folder_as_it_was_and_a_new_run_starts_its_own_metrics(
    resumable, small, tmp_path, capsys
):
    config = (resumable / "config.json").read_text()
    metrics = (resumable / "metrics.jsonl").read_text()
    rc = cli.main(
        [
            "train",
            "--train",
            str(tmp_path / "missing"),
            "--val",
            small[3],
            "--ckpt_dir",
            str(resumable),
            "--quiet",
            *tiny_flags(),
        ]
    )
    _one_line_error(rc, capsys.readouterr().err)
    assert (resumable / "config.json").read_text() == config  # still the run its checkpoints are from
    assert (resumable / "metrics.jsonl").read_text() == metrics
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--epochs",
            "1",
            "--quiet",
            *tiny_flags(max_steps_per_epoch=2),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert [(r["epoch"], r["complete"]) for r in read_jsonl(resumable / "metrics.jsonl")] == [(1, True)]


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_a_ckpt_dir_that_cannot_be_a_folder_is_a_user_error(small, tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker if kind == "a file" else blocker / "models"
    rc = cli.main(["train", *small, "--ckpt_dir", str(target), "--quiet", *tiny_flags()])
    line = _one_line_error(rc, capsys.readouterr().err)
    assert f"ckpt_dir {target}" in line and "choose another --ckpt_dir" in line


def test_resume_with_another_train_mode_is_a_user_error(resumable, small, capsys):
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "pair",
            "--resume",
            str(resumable / "last.pt"),
            "--epochs",
            "2",
            "--quiet",
            *tiny_flags(),
        ]
    )
    line = _one_line_error(rc, capsys.readouterr().err)
    assert line.startswith("error: cannot resume") and "train_mode='arcface'" in line


def test_resume_with_another_neck_is_a_user_error(resumable, small, capsys):
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--neck",
            "flat",
            "--resume",
            str(resumable / "last.pt"),
            "--epochs",
            "2",
            "--quiet",
            *tiny_flags(),
        ]
    )
    line = _one_line_error(rc, capsys.readouterr().err)
    assert line.startswith("error: cannot resume") and "neck='gap'" in line and "'flat'" in line


def test_resume_from_a_best_checkpoint_is_refused(resumable, small, capsys):
    rc = cli.main(
        [
            "train",
            *small,
            "--ckpt_dir",
            str(resumable),
            "--train_mode",
            "arcface",
            "--resume",
            str(resumable / "backbone_best.pt"),
            "--epochs",
            "2",
            "--quiet",
            *tiny_flags(),
        ]
    )
    assert "resume needs last.pt" in _one_line_error(rc, capsys.readouterr().err)


# --- bad input through the CLI ------------------------------------------------------------------


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_train_folder_in_a_child_process(tmp_path):
    missing = tmp_path / "no_such_train"
    proc = subprocess.run(
        faceid_cmd(
            "train", "--train", str(missing), "--val", str(SAMPLE_VAL), "--ckpt_dir", str(tmp_path / "m"), *tiny_flags()
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    line = _one_line_error(proc.returncode, proc.stderr)
    assert str(missing) in line and "--train" in line


def test_bad_config_json_in_a_child_process(tmp_path):
    bad = tmp_path / "job.json"
    bad.write_text('{"epochs": 2,')
    proc = subprocess.run(
        faceid_cmd("train", "--config", str(bad)), capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    line = _one_line_error(proc.returncode, proc.stderr)
    assert str(bad) in line and "not valid JSON" in line


def _train_error(capsys, tmp_path, *argv: str) -> str:
    events = tmp_path / "events.jsonl"
    rc = cli.main(["train", "--ckpt_dir", str(tmp_path / "models"), "--events_file", str(events), *tiny_flags(), *argv])
    line = _one_line_error(rc, capsys.readouterr().err)
    failed = read_jsonl(events)[-1]
    assert failed["event"] == "failed" and failed["error"] == line.removeprefix("error: ")
    return line


def test_empty_train_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _train_error(capsys, tmp_path, "--train", str(empty), "--val", str(SAMPLE_VAL))
    assert str(empty) in line and "no images" in line


def test_train_folder_with_one_identity(tmp_path, capsys):
    one = make_identity_folder(tmp_path / "one", {"ann": 3})
    line = _train_error(capsys, tmp_path, "--train", str(one), "--val", str(SAMPLE_VAL))
    assert str(one) in line and "at least 2" in line


def test_val_without_a_pair(tmp_path, capsys):
    val = make_identity_folder(tmp_path / "val", {"ann": 1, "bob": 1})
    line = _train_error(capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(val))
    assert str(val) in line and "2 or more images" in line and "--val" in line


def test_val_with_one_usable_person(tmp_path, capsys):
    val = make_identity_folder(tmp_path / "val", {"ann": 3, "bob": 1})
    line = _train_error(capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(val))
    assert str(val) in line and "at least 2" in line


def test_missing_val_folder(tmp_path, capsys):
    line = _train_error(capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(tmp_path / "nv"))
    assert str(tmp_path / "nv") in line


def test_pretrained_without_weights_fails_before_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import faceid.trainer_setup

    def no_decoding(*a, **k):
        raise AssertionError("images were decoded before the missing weights were noticed")

    monkeypatch.setattr(faceid.trainer_setup, "load_images", no_decoding)
    line = _train_error(capsys, tmp_path, *DATA, "--pretrained")
    assert "--pretrained_weights" in line and "no download" in line


def test_invalid_flag_value(tmp_path, capsys):
    rc = cli.main(["train", *DATA, "--ckpt_dir", str(tmp_path / "m"), "--epochs", "-1"])
    assert _one_line_error(rc, capsys.readouterr().err).startswith("error: --epochs:")
    assert not (tmp_path / "m").exists()  # nothing is written for a config that cannot run


# --- evaluate / embed / verify on the trained checkpoint ----------------------------------------


def test_verify_command(arc, capsys):
    a, b = sample_images(2)
    rc = cli.main(["verify", str(a), str(b), "--checkpoint", str(arc.best), "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    parts = out.split()
    assert parts[0] == "similarity" and parts[2] == "threshold" and parts[4] == "(acc)"
    sim, th = float(parts[1]), float(parts[3])
    assert th == pytest.approx(arc.result.thresholds["acc"], abs=1e-4)
    decision = out.split("->")[1].strip()
    assert decision in ("MATCH", "NO MATCH")
    if abs(sim - th) > 1e-4:
        assert (decision == "MATCH") == (sim >= th)


def test_verify_json_and_named_threshold(arc, capsys):
    a, b = sample_images(2)
    rc = cli.main(
        [
            "verify",
            str(a),
            str(b),
            "--checkpoint",
            str(arc.best),
            "--device",
            "cpu",
            "--json",
            "--threshold",
            "far_1e-3",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["threshold_name"] == "far_1e-3" and res["match"] == (res["similarity"] >= res["threshold"])
    rc = cli.main(
        ["verify", str(a), str(a), "--checkpoint", str(arc.best), "--device", "cpu", "--json", "--threshold", "0.5"]
    )
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["threshold"] == 0.5 and res["match"] is True
    assert res["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_verify_with_a_bad_threshold_or_image(arc, tmp_path, capsys):
    a, b = sample_images(2)
    rc = cli.main(["verify", str(a), str(b), "--checkpoint", str(arc.best), "--threshold", "far_1e-9"])
    assert "unknown threshold" in _one_line_error(rc, capsys.readouterr().err)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    rc = cli.main(["verify", str(a), str(junk), "--checkpoint", str(arc.best)])
    assert str(junk) in _one_line_error(rc, capsys.readouterr().err)
    rc = cli.main(["verify", str(a), str(b), "--checkpoint", str(tmp_path / "none.pt")])
    assert "checkpoint not found" in _one_line_error(rc, capsys.readouterr().err)


def test_embed_command(arc, capsys):
    imgs = sample_images(2)
    rc = cli.main(["embed", *map(str, imgs), "--checkpoint", str(arc.best), "--device", "cpu"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in imgs]
    for x in lines:
        e = np.asarray(x["embedding"])
        assert x["dim"] == len(e) == arc.cfg.embedding_size
        assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-4)


def test_evaluate_command_reproduces_the_training_metrics(arc, capsys):
    rc = cli.main(
        [
            "evaluate",
            str(arc.best),
            "--val",
            str(SAMPLE_VAL),
            "--pairs_file",
            str(SAMPLE_PAIRS),
            "--eval_pairs",
            str(TINY["eval_pairs"]),
            "--seed",
            str(TINY["seed"]),
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    ck = load_checkpoint(arc.best)
    assert res["epoch"] == 1
    for k in ("acc", "th", "auc", "tar_1e-2", "tar_1e-3", "pairs_acc", "pairs_auc"):
        assert k in res, k
    for k in ("acc", "auc", "pairs_acc", "pairs_auc"):
        assert 0.0 <= res[k] <= 1.0
        # same model, images, pairs and seed as the evaluation during training
        assert res[k] == pytest.approx(ck["metrics"][k], abs=0.02), k
    assert 0.0 <= res["pairs_acc_at_checkpoint_th"] <= 1.0


def test_evaluate_needs_something_to_score(arc, capsys):
    rc = cli.main(["evaluate", str(arc.best)])
    assert "--val" in _one_line_error(rc, capsys.readouterr().err)


def test_the_crop_reaches_every_decoded_image_and_the_checkpoint(small, tmp_path):
    """--crop 0.6: training, validation and pairs-file images are decoded with it, and the
    checkpoint carries it for the Verifier (tests/test_inference.py serves such a checkpoint)."""
    from faceid.data import decode_image
    from faceid.run_state import checkpoint_dict
    from faceid.train import Trainer

    cfg = TrainConfig(
        train=small[1],
        val=str(SAMPLE_VAL),
        pairs_file=str(SAMPLE_PAIRS),
        ckpt_dir=str(tmp_path),
        train_mode="arcface",
        epochs=1,
        crop=0.6,
        **TINY,
    )
    trainer = Trainer(cfg)
    trainer.setup()
    stores = [trainer.train_store, trainer.val_store, trainer.protocol[0]]
    for store in stores:
        assert store.crop == 0.6
        np.testing.assert_array_equal(store.batch([0])[0].numpy(), decode_image(store.folder.paths[0], 32, 0.6))
    assert not np.array_equal(
        decode_image(stores[0].folder.paths[0], 32, 0.6), decode_image(stores[0].folder.paths[0], 32)
    )
    ck = checkpoint_dict(cfg, trainer.model, 1, {"th": 0.5})
    assert ck["crop"] == 0.6 and ck["config"]["crop"] == 0.6
    trainer.dist.close()


def test_crop_outside_its_range_is_refused(capsys):
    assert cli.main(["train", "--crop", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "crop" in err and "0.3" in err


def test_the_trainer_does_not_import_the_command_line():
    """faceid.cli imports faceid.train, never the other way round (no import circle)."""
    import subprocess
    import sys

    from core_fixtures import subprocess_env

    code = "import sys, faceid.train; print('faceid.cli' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
