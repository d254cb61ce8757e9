"""faceid.config + the train CLI's flags: origin defaults, the CLI <-> TrainConfig round trip,
--config files, presets, and one-line validation errors that name the flag."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from core_fixtures import subprocess_env
from pydantic import ValidationError

from faceid.cli_common import UserError
from faceid.cli_train import _unwrap_optional, build_train_parser, config_from_args
from faceid.config import PRESETS, TrainConfig

FIELDS = TrainConfig.model_fields


def parse(argv: list[str], config_file: str | None = None) -> TrainConfig:
    ns = build_train_parser().parse_args(argv)
    return config_from_args(ns, config_file if config_file is not None else ns.config)


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_are_the_origins():
    cfg = TrainConfig()
    # documented by the origin README
    assert cfg.batch_size == 256
    assert cfg.img_size == 224
    assert cfg.best_metric == "acc"
    assert cfg.train_mode == "pair"  # the origin's pair-mode command gives no --train_mode
    assert cfg.ckpt_dir == "models"
    assert cfg.arcface_s == 64.0 and cfg.arcface_m == 0.5
    assert cfg.embedding_size == 512
    # origin flags that switch something on default to off
    assert cfg.pretrained is False and cfg.pretrained_weights is None
    assert cfg.freeze_backbone_epochs == 0
    assert cfg.clip_grad_norm == 0.0
    assert cfg.warmup_epochs == 0.0
    assert cfg.backbone_lr_scale == 1.0
    assert cfg.scheduler == "cosine"
    assert cfg.easy_margin is False
    assert cfg.preset is None and cfg.resume is None and cfg.pairs_file is None


def test_no_flags_gives_the_defaults():
    assert parse([]) == TrainConfig()


def test_every_origin_flag_exists():
    origin = [
        "train_mode",
        "pretrained",
        "freeze_backbone_epochs",
        "epochs",
        "workers",
        "batch_size",
        "img_size",
        "eval_pairs",
        "pairs_per_epoch",
        "scale_logits",
        "scheduler",
        "warmup_epochs",
        "backbone_lr_scale",
        "progress_step_pct",
        "clip_grad_norm",
        "arcface_s",
        "arcface_m",
        "train",
        "val",
        "ckpt_dir",
        "best_metric",
    ]
    added = [
        "lr",
        "weight_decay",
        "optimizer",
        "embedding_size",
        "seed",
        "device",
        "amp",
        "easy_margin",
        "pretrained_weights",
        "resume",
    ]
    assert set(origin + added) <= set(FIELDS)


def test_config_is_frozen_and_rejects_unknown_keys():
    cfg = TrainConfig()
    with pytest.raises(ValidationError):
        cfg.epochs = 3
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(epochz=3)


# --- CLI <-> config round trip ------------------------------------------------------------------


def _non_default(name: str) -> Any:
    """A valid value for field `name` that differs from its default, chosen from its type."""
    f = FIELDS[name]
    tp = _unwrap_optional(f.annotation)
    default = f.default
    if tp is bool:
        return not default
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != default)
    if typing.get_origin(tp) is list:
        return [1, 3]
    if tp is int:
        return (default or 0) + 1
    if tp is float:
        upper = min((m.le for m in f.metadata if hasattr(m, "le")), default=math.inf)
        return default + 0.25 if default + 0.25 <= upper else default - 0.25
    if tp is str:
        return f"{default or name}_x/y z"  # a space survives the round trip too
    raise AssertionError(f"no generator for {name}: {f.annotation}")


def _as_flags(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for name, v in values.items():
        if isinstance(v, bool):
            argv.append(f"--{name}" if v else f"--no-{name}")
        elif isinstance(v, list):
            argv += [f"--{name}", *map(str, v)]
        else:
            argv += [f"--{name}", repr(v) if isinstance(v, float) else str(v)]
    return argv


def test_every_field_round_trips_through_the_cli():
    values = {name: _non_default(name) for name in FIELDS}
    for name, v in values.items():
        assert v != FIELDS[name].default, name
    # keep the combination valid: a pairs_* metric is allowed because pairs_file is set; init_from
    # (a FaceID model) excludes pretrained (ImageNet weights), so it makes a round trip of its own
    assert values["pairs_file"] and values["freeze_backbone_epochs"] < values["epochs"]
    init_from = values.pop("init_from")
    assert parse(["--init_from", init_from]).init_from == init_from

    expected = TrainConfig(**values)
    got = parse(_as_flags(values))

    assert got == expected
    for name in values:
        assert getattr(got, name) == values[name], name
    # and back: the resolved config, as JSON, through --config gives the same config again
    assert TrainConfig(**json.loads(json.dumps(got.to_json_dict()))) == got


def test_round_trip_through_a_config_file(tmp_path):
    values = {name: _non_default(name) for name in FIELDS if name != "init_from"}  # it excludes pretrained
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(TrainConfig(**values).to_json_dict()))
    assert parse(["--config", str(f)]) == TrainConfig(**values)


def test_boolean_flags_have_both_forms():
    assert parse(["--pretrained"]).pretrained is True
    assert parse(["--no-channels_last"]).channels_last is False
    assert parse(["--channels_last"]).channels_last is True


def test_config_file_plus_flag_override(tmp_path):
    f = tmp_path / "job.json"
    f.write_text(json.dumps({"epochs": 7, "lr": 0.01, "train_mode": "arcface", "img_size": 112}))
    cfg = parse(["--config", str(f), "--epochs", "3", "--img_size", "64"])
    assert cfg.epochs == 3 and cfg.img_size == 64  # flags win
    assert cfg.lr == 0.01 and cfg.train_mode == "arcface"  # the file fills the rest
    assert cfg.batch_size == 256  # defaults where neither says


def test_preset_fills_unset_fields_and_explicit_fields_win(tmp_path):
    preset = PRESETS["cpu-small"]
    cfg = parse(["--preset", "cpu-small", "--epochs", "3", "--lr", "0.02"])
    assert cfg.epochs == 3 and cfg.lr == 0.02
    for k, v in preset.items():
        if k not in ("epochs", "lr"):
            assert getattr(cfg, k) == v, k
    # a preset in a config file, with a flag and a file value on top of it
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"preset": "cpu-small", "img_size": 96}))
    cfg = parse(["--config", str(f), "--batch_size", "32"])
    assert cfg.img_size == 96 and cfg.batch_size == 32 and cfg.arcface_m == preset["arcface_m"]
    # the preset is remembered (the checkpoint's config says where the values came from)
    assert cfg.preset == "cpu-small"


# --- validation errors --------------------------------------------------------------------------


def _user_error(argv: list[str], config_file: str | None = None) -> str:
    with pytest.raises(UserError) as ei:
        parse(argv, config_file)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_negative_epochs():
    msg = _user_error(["--epochs", "-1"])
    assert msg.startswith("--epochs:") and "greater than or equal to 1" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_or_negative_lr(value):
    assert _user_error(["--lr", value]).startswith("--lr:")


def test_nan_in_a_ge0_float_names_the_flag():
    msg = _user_error(["--clip_grad_norm", "nan"])
    assert msg.startswith("--clip_grad_norm:")


def test_unknown_best_metric_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as ei:
        build_train_parser().parse_args(["--best_metric", "f1"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--best_metric" in err and "invalid choice" in err and "tar_1e-3" in err


def test_unknown_best_metric_in_a_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"best_metric": "f1"}))
    msg = _user_error(["--config", str(f)])
    assert msg.startswith("--best_metric:") and "'acc'" in msg


def test_pairs_best_metric_needs_a_pairs_file():
    msg = _user_error(["--best_metric", "pairs_acc"])
    assert "best_metric" in msg and "pairs_file" in msg
    assert parse(["--best_metric", "pairs_auc", "--pairs_file", "p.txt"]).best_metric == "pairs_auc"


@pytest.mark.parametrize("freeze,epochs", [(5, 5), (6, 5)])
def test_freezing_for_all_epochs_is_an_error(freeze, epochs):
    msg = _user_error(["--freeze_backbone_epochs", str(freeze), "--epochs", str(epochs)])
    assert "freeze_backbone_epochs" in msg and "epochs" in msg
    assert parse(["--freeze_backbone_epochs", str(epochs - 1), "--epochs", str(epochs)])


def test_several_errors_in_one_line():
    msg = _user_error(["--epochs", "0", "--img_size", "8"])
    assert "--epochs:" in msg and "--img_size:" in msg


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epocs": 3}))
    assert _user_error(["--config", str(f)]).startswith("--epocs:")


@pytest.mark.parametrize("content,fragment", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_config_file(tmp_path, content, fragment):
    f = tmp_path / "c.json"
    f.write_text(content)
    msg = _user_error(["--config", str(f)])
    assert fragment in msg and str(f) in msg


def test_missing_config_file(tmp_path):
    msg = _user_error(["--config", str(tmp_path / "nope.json")])
    assert "not found" in msg and "nope.json" in msg


# --- --help -------------------------------------------------------------------------------------


def test_train_help_mentions_every_field():
    exe = shutil.which("faceid", path=str(Path(sys.executable).parent))
    cmd = [exe, "train", "--help"] if exe else [sys.executable, "-m", "faceid.cli", "train", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in FIELDS:
        assert f"--{name}" in text, name
    assert "--config" in text and "--events_file" in text
    # each field's help says what it does (its description is there, whitespace-normalised)
    flat = " ".join(text.split())
    for name, f in FIELDS.items():
        first_words = " ".join(f.description.split()[:3])
        assert first_words in flat, (name, first_words)
    assert "default: 256" in flat  # defaults are shown


# --- strict numbers, finite floats, contradictory fields ----------------------------------------

NUMBER_FIELDS = [n for n, f in FIELDS.items() if f.annotation in (int, float)]
FLOAT_FIELDS = [n for n in NUMBER_FIELDS if FIELDS[n].annotation is float]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_float_is_named_as_such(name, value):
    # before: a bound check answered first ("--lr: Input should be less than or equal to 10")
    assert _user_error([f"--{name}={value}"]) == f"--{name}: must be a finite number"


@pytest.mark.parametrize("name", NUMBER_FIELDS)
@pytest.mark.parametrize("value,words", [(True, "not true"), (False, "not false"), ("3", "not a string")])
def test_a_number_field_refuses_booleans_and_strings(name, value, words):
    with pytest.raises(ValidationError) as ei:
        TrainConfig(**{name: value})
    errors = ei.value.errors()
    assert [e["loc"] for e in errors] == [(name,)]
    assert words in errors[0]["msg"]


def test_a_boolean_number_in_a_config_file_names_the_field(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": True, "lr": "0.01"}))
    msg = _user_error(["--config", str(f)])
    assert "--epochs: must be a whole number, not true" in msg and "--lr: must be a number, not a string" in msg


def test_numbers_and_strings_still_fit_their_fields():
    cfg = TrainConfig(
        epochs=3.0,
        lr=1,
        train="some/dir",
        pretrained_weights="w.pth",
        resume="r/last.pt",
        pairs_file="p.txt",
        pairs_folds=[2, 1],
    )
    assert cfg.epochs == 3 and cfg.lr == 1.0 and cfg.train == "some/dir" and cfg.pairs_folds == [1, 2]
    with pytest.raises(ValidationError):
        TrainConfig(pairs_file="p.txt", pairs_folds=[True])


def test_pretrained_weights_imply_and_record_pretrained(tmp_path):
    cfg = parse(["--pretrained_weights", "w.pth"])
    assert cfg.pretrained is True and cfg.to_json_dict()["pretrained"] is True
    assert parse(["--pretrained", "--pretrained_weights", "w.pth"]).pretrained is True
    # the stored config reads back as it was
    assert TrainConfig(**cfg.to_json_dict()) == cfg


def test_no_pretrained_with_pretrained_weights_is_refused_on_the_command_line(tmp_path):
    msg = _user_error(["--no-pretrained", "--pretrained_weights", "w.pth"])
    assert msg.startswith("--pretrained_weights is given together with --no-pretrained") and "from scratch" in msg
    # a config stored before weights implied pretrained (it said false) still loads, now true to its run
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"pretrained": False, "pretrained_weights": "w.pth"}))
    assert parse(["--config", str(f)]).pretrained is True


def test_pairs_folds_need_a_pairs_file():
    msg = _user_error(["--pairs_folds", "3"])
    assert msg.startswith("--pairs_folds:") and "--pairs_file" in msg
    with pytest.raises(ValidationError) as ei:  # the POST /jobs body: a 422 on field pairs_folds
        TrainConfig(pairs_folds=[3])
    assert [e["loc"] for e in ei.value.errors()] == [("pairs_folds",)]
    assert parse(["--pairs_folds", "3", "--pairs_file", "p.txt"]).pairs_folds == [3]


def test_a_folder_as_config_file(tmp_path):
    msg = _user_error(["--config", str(tmp_path)])
    assert str(tmp_path) in msg and "folder" in msg and "JSON file" in msg


def test_help_states_each_default_once():
    text = build_train_parser().format_help()
    entry = " ".join(text.split("--pairs_folds PAIRS_FOLDS")[-1].split("--ckpt_dir")[0].split())
    assert entry.count("(default:") == 1 and "(default: all)" in entry
