"""Fine-tuning (`--init_from`): a run starts from a FaceID model's trunk and embedding layer with a
new ArcFace head for its own people; a model that does not fit the run is refused before any data
is read, with the flags that fix it."""

from __future__ import annotations

import json

import pytest
import torch
from core_fixtures import TINY, small_sample, tiny_arcface_run, tiny_flags

from faceid import cli
from faceid.checkpoint import load_checkpoint
from faceid.cli_train import build_train_parser, config_from_args
from faceid.config import TrainConfig
from faceid.errors import ConfigError
from faceid.train import Trainer, check_before_launch, run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_arcface_run(tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_sample(tmp_path_factory)


def fine_tune_config(base, train, val, tmp_path) -> TrainConfig:
    """One tiny arcface epoch on the small sample, from the shared tiny run's model."""
    return TrainConfig(
        train=str(train),
        val=str(val),
        ckpt_dir=str(tmp_path / "ft"),
        init_from=str(base.best),
        train_mode="arcface",
        epochs=1,
        **TINY,
    )


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


def test_the_run_starts_from_the_base_model_with_a_head_for_its_own_people(base, small, tmp_path):
    train, val = small
    cfg = fine_tune_config(base, train, val, tmp_path)
    trainer = Trainer(cfg)
    trainer.setup()
    want = load_checkpoint(base.best)["model"]
    got = trainer.model.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k].cpu(), v), k
    # the head is the run's own: one row per person of the small sample, not the base's people
    head = trainer.objective.head.weight
    base_head = load_checkpoint(base.last)["head"]["weight"]
    assert head.shape[0] == trainer.train_folder.num_identities == 6 != base_head.shape[0]


def test_a_fine_tuned_run_trains_and_records_where_it_started(base, small, tmp_path):
    train, val = small
    cfg = fine_tune_config(base, train, val, tmp_path)
    result = run(cfg)
    ck = load_checkpoint(result.best_checkpoint)
    assert ck["config"]["init_from"] == str(base.best)
    # it trained: the weights moved away from the base's
    start = load_checkpoint(base.best)["model"]
    moved = [k for k, v in ck["model"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["init_from"] == str(base.best)


def test_a_resumed_fine_tune_goes_on_from_its_own_last_checkpoint(base, small, tmp_path):
    train, val = small
    first = fine_tune_config(base, train, val, tmp_path)
    run(first)
    last = tmp_path / "ft" / "last.pt"
    again = first.model_copy(update={"epochs": 2, "resume": str(last)})
    trainer = Trainer(again)
    trainer.setup()
    resumed = load_checkpoint(last)["model"]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v.cpu(), resumed[k]), k


@pytest.mark.parametrize(
    "flag,value,fix",
    [
        ("img_size", "48", "set --img_size 32"),
        ("embedding_size", "64", "set --embedding_size 512"),
        ("align", "arcface", "set --align none"),
    ],
)
def test_a_base_model_that_does_not_fit_is_one_line_naming_the_flags(base, small, tmp_path, capsys, flag, value, fix):
    train, val = small
    msg = one_line_error(
        capsys,
        [
            "train",
            *tiny_flags(**{flag: value}),
            "--train",
            str(train),
            "--val",
            str(val),
            "--ckpt_dir",
            str(tmp_path / "ft"),
            "--init_from",
            str(base.best),
        ],
    )
    assert msg.startswith(f"init_from {base.best} was trained with") and msg.endswith(f"{fix} to fine-tune it"), msg
    assert not (tmp_path / "ft" / "metrics.jsonl").exists()


def test_a_file_that_is_not_a_model_is_one_line(base, small, tmp_path, capsys):
    train, val = small
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    common = ["train", *tiny_flags(), "--train", str(train), "--val", str(val), "--ckpt_dir", str(tmp_path / "ft")]
    msg = one_line_error(capsys, [*common, "--init_from", str(text)])
    assert msg.startswith(f"--init_from model {text} is not a PyTorch checkpoint"), msg
    msg = one_line_error(capsys, [*common, "--init_from", str(tmp_path / "gone.pt")])
    assert msg.startswith(f"--init_from model not found: {tmp_path / 'gone.pt'}; give the model to fine-tune"), msg
    msg = one_line_error(capsys, [*common, "--init_from", str(base.ckpt_dir)])
    assert msg.endswith(f"give the file inside it, {base.best}"), msg
    weights = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    msg = one_line_error(capsys, [*common, "--init_from", str(weights)])
    assert msg.startswith(f"{weights} is not a FaceID checkpoint"), msg


def test_init_from_with_pretrained_is_refused():
    with pytest.raises(ValueError, match="init_from and pretrained both give the trunk its first weights"):
        TrainConfig(train="t", val="v", init_from="m.pt", pretrained=True)


def test_the_launch_check_refuses_a_base_that_does_not_fit(base, small, tmp_path):
    train, val = small
    cfg = TrainConfig(
        train=str(train),
        val=str(val),
        ckpt_dir=str(tmp_path / "ft"),
        init_from=str(base.best),
        **{**TINY, "neck": "flat"},
    )
    with pytest.raises(ConfigError, match="set --neck gap to fine-tune it"):
        check_before_launch(cfg)


def test_settings_the_base_fixes_come_from_it_unless_given(base, small, tmp_path):
    train, val = small
    common = ["--train", str(train), "--val", str(val), "--init_from", str(base.best)]
    cfg = config_from_args(build_train_parser().parse_args([*common, "--preset", "cpu-small"]))
    # the base is TINY (32 px, no alignment) with the default neck: the preset's 56 px, aligned,
    # flat-neck values yield to it, the rest of the preset stays
    assert (cfg.img_size, cfg.align, cfg.neck, cfg.embedding_size, cfg.crop) == (32, "none", "gap", 512, 1.0)
    assert cfg.lr == 1e-3 and cfg.optimizer == "adamw"
    check_before_launch(cfg)
    cfg = config_from_args(build_train_parser().parse_args([*common, "--preset", "finetune"]))
    assert cfg.img_size == 32 and cfg.freeze_backbone_epochs == 2 and cfg.backbone_lr_scale == 0.1
    # a value given on the command line is the caller's, and is refused when it does not fit
    cfg = config_from_args(build_train_parser().parse_args([*common, "--img_size", "64"]))
    with pytest.raises(ConfigError, match="set --img_size 32 to fine-tune it"):
        check_before_launch(cfg)
