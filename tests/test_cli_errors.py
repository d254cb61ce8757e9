"""User errors of the `faceid` command: each is one line on stderr, `error: ...`, exit code 2, that
names the file or flag and the fix; and `faceid evaluate` reproduces the training's evaluation of
a checkpoint by default."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from core_fixtures import (
    SAMPLE_PAIRS,
    SAMPLE_TRAIN,
    SAMPLE_VAL,
    TINY,
    faceid_cmd,
    make_identity_folder,
    small_sample,
    subprocess_env,
    tiny_arcface_run,
    tiny_flags,
)

from faceid import cli
from faceid.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def arc(tmp_path_factory):
    """The shared tiny arcface run (eval_pairs 200, seed 0: not evaluate's old 20000 and 42)."""
    return tiny_arcface_run(tmp_path_factory)


def one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def run_error(capsys, argv: list[str]) -> str:
    """`faceid ARGV` in-process, whether the error comes from argparse (SystemExit) or a check."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return one_line_error(rc, capsys.readouterr().err)


def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "notes.pt"
    p.write_text("these are notes, not weights\n")
    return p


# --- faceid evaluate: flags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,bound",
    [
        ("--eval_pairs", "0", "2"),
        ("--eval_pairs", "1", "2"),
        ("--eval_pairs", "-5", "2"),
        ("--workers", "-1", "0"),
        ("--seed", "-1", "0"),
    ],
)
def test_evaluate_numeric_flags_have_the_training_bounds(arc, capsys, flag, value, bound):
    msg = run_error(capsys, ["evaluate", str(arc.best), "--val", str(SAMPLE_VAL), flag, value, "--device", "cpu"])
    assert msg.startswith(f"{flag}:") and f"greater than or equal to {bound}" in msg


def test_evaluate_pairs_folds_without_a_pairs_file(arc, capsys):
    msg = run_error(capsys, ["evaluate", str(arc.best), "--val", str(SAMPLE_VAL), "--pairs_folds", "2"])
    assert "--pairs_folds" in msg and "--pairs_file" in msg


def test_evaluate_defaults_to_the_checkpoints_pairs_and_seed(arc, capsys):
    """The same checkpoint and --val give the numbers of the training log, to the last bit."""
    rc = cli.main(["evaluate", str(arc.best), "--val", str(SAMPLE_VAL), "--workers", "0", "--device", "cpu"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    logged = load_checkpoint(arc.best)["metrics"]
    assert res["eval_pairs"] == TINY["eval_pairs"] and res["seed"] == TINY["seed"]
    assert res["n_pos"] + res["n_neg"] == TINY["eval_pairs"]
    for k in ("acc", "th", "auc", "tar_1e-2", "tar_1e-3", "th_far_1e-2", "th_far_1e-3"):
        assert res[k] == logged[k], k
    last = [json.loads(line) for line in (arc.ckpt_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert (res["acc"], res["th"]) == (last["acc"], last["th"])
    # given flags still win
    rc = cli.main(
        [
            "evaluate",
            str(arc.best),
            "--val",
            str(SAMPLE_VAL),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--eval_pairs",
            "50",
            "--seed",
            "3",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["n_pos"] + res["n_neg"] == 50 and res["seed"] == 3


def test_evaluate_reproduces_a_run_with_amp_off_and_flip(tmp_path_factory, capsys):
    """The checkpoint's precision and mirror averaging too: auto would pick bf16 on a CPU with
    native bf16, where this run evaluated in fp32."""
    train, val = small_sample(tmp_path_factory)
    ckpt_dir = tmp_path_factory.mktemp("amp_off")
    rc = cli.main(
        [
            "train",
            "--train",
            str(train),
            "--val",
            str(val),
            "--ckpt_dir",
            str(ckpt_dir),
            "--quiet",
            *tiny_flags(train_mode="arcface", epochs=1, amp="off", eval_flip=True, seed=5, eval_pairs=60),
        ]
    )
    assert rc == 0
    rc = cli.main(["evaluate", str(ckpt_dir / "backbone_best.pt"), "--val", str(val), "--workers", "0"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert res["n_pos"] + res["n_neg"] == 60
    for k in ("acc", "th", "auc", "th_far_1e-2"):
        assert res[k] == last[k], k


def test_evaluate_help_documents_every_argument(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["evaluate", "--help"])
    assert ei.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: models/backbone_best.pt)" in flat
    assert "--eval_pairs N balanced pairs sampled from --val (default: the checkpoint's eval_pairs" in flat
    assert "--seed N seed of the sampled pairs (default: the checkpoint's seed" in flat
    assert "--workers N image-decoding worker processes (default: 2)" in flat


# --- argparse errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,fragment,prog",
    [
        (["train", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'", "faceid train"),
        (["train", "--foo", "3"], "unrecognized arguments: --foo 3", "faceid train"),
        (["train", "--best_metric", "f1"], "argument --best_metric: invalid choice: 'f1'", "faceid train"),
        (["evaluate", "--eval_pairs", "x"], "argument --eval_pairs: invalid int value: 'x'", "faceid evaluate"),
        (["verify", "a.jpg"], "the following arguments are required: image2", "faceid verify"),
        (["bogus"], "invalid choice: 'bogus'", "faceid"),
    ],
)
def test_parser_errors_are_one_line(capsys, argv, fragment, prog):
    msg = run_error(capsys, argv)
    assert fragment in msg and msg.endswith(f"; see {prog} --help")


def test_parser_error_in_a_child_process_and_help_still_prints_usage():
    proc = subprocess.run(
        faceid_cmd("train", "--epochs", "abc"), capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert one_line_error(proc.returncode, proc.stderr) == (
        "argument --epochs: invalid int value: 'abc'; see faceid train --help"
    )
    assert proc.stdout == ""
    proc = subprocess.run(
        faceid_cmd("train", "--help"), capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: faceid train") and proc.stderr == ""


# --- faceid train: files and data ----------------------------------------------------------------


def train_error(capsys, tmp_path: Path, *argv: str) -> str:
    """A refused run: the one line, also as the events file's failed event (what a job shows)."""
    events = tmp_path / "events.jsonl"
    rc = cli.main(["train", "--ckpt_dir", str(tmp_path / "models"), "--events_file", str(events), *tiny_flags(), *argv])
    msg = one_line_error(rc, capsys.readouterr().err)
    failed = json.loads(events.read_text().splitlines()[-1])
    assert failed["event"] == "failed" and failed["error"] == msg
    return msg


def test_config_that_is_a_folder(tmp_path, capsys):
    msg = run_error(capsys, ["train", "--config", str(tmp_path)])
    assert msg == f"--config {tmp_path} is a folder; give a JSON file of TrainConfig fields"


def test_a_text_file_as_pretrained_weights(tmp_path, capsys):
    notes = text_file(tmp_path)
    msg = train_error(
        capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(SAMPLE_VAL), "--pretrained_weights", str(notes)
    )
    assert msg.startswith(f"--pretrained_weights {notes} is not a PyTorch state dict: it is text")
    assert "resnet50 state-dict file" in msg and "weights_only" not in msg


def test_a_folder_as_pretrained_weights(tmp_path, capsys):
    msg = train_error(
        capsys,
        tmp_path,
        "--train",
        str(SAMPLE_TRAIN),
        "--val",
        str(SAMPLE_VAL),
        "--pretrained_weights",
        str(SAMPLE_TRAIN),
    )
    assert f"{SAMPLE_TRAIN} is a folder" in msg and "resnet50 state-dict file" in msg


def test_a_text_file_or_a_folder_as_resume(tmp_path, capsys):
    notes = text_file(tmp_path)
    msg = train_error(capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(SAMPLE_VAL), "--resume", str(notes))
    assert f"{notes} is not a PyTorch checkpoint: it is text" in msg and "last.pt" in msg
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    msg = train_error(capsys, tmp_path, "--train", str(SAMPLE_TRAIN), "--val", str(SAMPLE_VAL), "--resume", str(run))
    assert f"{run} is a folder" in msg and f"give the file inside it, {run / 'last.pt'}" in msg


def test_no_pretrained_with_weights_is_refused(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    msg = run_error(
        capsys,
        [
            "train",
            "--train",
            str(SAMPLE_TRAIN),
            "--val",
            str(SAMPLE_VAL),
            "--ckpt_dir",
            str(tmp_path / "m"),
            "--no-pretrained",
            "--pretrained_weights",
            str(weights),
        ],
    )
    assert msg.startswith("--pretrained_weights is given together with --no-pretrained")
    assert not (tmp_path / "m").exists()


def test_pair_mode_with_one_image_per_person(tmp_path, capsys):
    train = make_identity_folder(tmp_path / "train", {"ann": 1, "bob": 1, "cid": 1})
    msg = train_error(capsys, tmp_path, "--train", str(train), "--val", str(SAMPLE_VAL), "--train_mode", "pair")
    assert msg.startswith(f"--train folder {train} has no identity with 2 or more readable images")
    assert "add a second image" in msg and "--train_mode arcface" in msg


def test_train_folder_of_mostly_unreadable_images(tmp_path, capsys):
    train = make_identity_folder(tmp_path / "train", {"ann": 3})
    for name in ("bob", "cid", "dee"):
        for i in range(2):
            (train / name).mkdir(exist_ok=True)
            (train / name / f"{name}_{i}.jpg").write_text("not an image")
    msg = train_error(capsys, tmp_path, "--train", str(train), "--val", str(SAMPLE_VAL), "--train_mode", "arcface")
    assert f"{train} has 1 identity folder(s) with readable images" in msg
    assert "6 unreadable image(s)" in msg and "at least 2" in msg


# --- checkpoints given to evaluate and verify ----------------------------------------------------


def test_a_text_file_as_checkpoint(tmp_path, capsys):
    notes = text_file(tmp_path)
    a, b = sorted(SAMPLE_VAL.rglob("*.jpg"))[:2]
    for argv in (
        ["evaluate", str(notes), "--val", str(SAMPLE_VAL)],
        ["verify", str(a), str(b), "--checkpoint", str(notes)],
    ):
        msg = run_error(capsys, argv)
        assert msg.startswith(f"checkpoint {notes} is not a PyTorch checkpoint: it is text"), msg
        assert "backbone_best.pt or last.pt" in msg


class _Pickled:
    def __init__(self):
        self.x = 1


def test_a_checkpoint_of_python_objects_gets_no_weights_only_advice(tmp_path, capsys):
    p = tmp_path / "model.pt"
    torch.save({"model": _Pickled()}, p)
    msg = run_error(capsys, ["evaluate", str(p), "--val", str(SAMPLE_VAL)])
    assert f"cannot read checkpoint {p}: it holds Python objects" in msg and "weights-only" in msg
    assert "weights_only" not in msg and "can still be loaded" not in msg


def test_a_run_folder_as_checkpoint_names_the_file_inside(arc, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(arc.best, run / "backbone_best.pt")
    msg = run_error(capsys, ["evaluate", str(run), "--val", str(SAMPLE_VAL)])
    assert msg == (f"checkpoint file not found: {run} is a folder; give the file inside it, {run / 'backbone_best.pt'}")


def test_evaluate_pairs_file_without_its_images_names_pairs_root(arc, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    shutil.copy(SAMPLE_PAIRS, pairs)  # its images are not beside it
    msg = run_error(capsys, ["evaluate", str(arc.best), "--pairs_file", str(pairs), "--device", "cpu"])
    assert "missing under" in msg and "give --pairs_root DIR" in msg and "--val DIR" in msg
