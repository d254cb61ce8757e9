"""Checks made before a training run reads its data or starts its processes, so that a mistake is
one line for the user: the weight files it names (`check_weight_files`), and, once before torchrun
starts a multi-process run, what every process would fail alike (`check_before_launch`)."""

from __future__ import annotations

from faceid.config import TrainConfig
from faceid.errors import CheckpointError, ConfigError, DataError


def check_weight_files(cfg: TrainConfig) -> None:
    """Name a folder, a text file or a missing file given as --pretrained_weights, --init_from or --resume
    before any data is read (reads a few bytes of each; the full load comes later)."""
    from faceid.checkpoint import EXPECTED_CHECKPOINT, torch_file_problem

    if cfg.pretrained_weights:
        problem = torch_file_problem(
            cfg.pretrained_weights,
            what="--pretrained_weights",
            noun="PyTorch state dict",
            expected="a torchvision resnet50 state-dict file (such as resnet50-11ad3fa6.pth)",
        )
        if problem:
            raise ConfigError(problem)
    if cfg.init_from:
        problem = torch_file_problem(
            cfg.init_from,
            what="--init_from model",
            noun="PyTorch checkpoint",
            expected=f"the model to fine-tune ({EXPECTED_CHECKPOINT})",
            look_for=("backbone_best.pt",),
        )
        if problem:
            raise CheckpointError(problem)
    if cfg.resume:
        problem = torch_file_problem(
            cfg.resume,
            what="--resume checkpoint",
            noun="PyTorch checkpoint",
            expected=f"the last.pt of the run to continue ({EXPECTED_CHECKPOINT})",
            look_for=("last.pt",),
        )
        if problem:
            raise CheckpointError(problem)


def check_before_launch(cfg: TrainConfig) -> None:
    """The checks every process of a multi-process run would fail alike, made once before torchrun
    starts them: the device, the data folders, the pretrained weights, the init_from model. Raises ConfigError or
    DataError (one line for the user) instead of every rank failing and torchrun's traceback."""
    from faceid.model import build_model, load_imagenet_weights
    from faceid.pairs import resolve_pairs_file
    from faceid.run_data import scan_run_folders
    from faceid.runtime import resolve_device
    from faceid.teacher_files import check_teacher

    resolve_device(cfg.device)
    check_teacher(cfg.distill)
    scan_run_folders(cfg)
    if cfg.pairs_file and not resolve_pairs_file(cfg.pairs_file, cfg.val).is_file():
        raise DataError(f"--pairs_file not found: {cfg.pairs_file}; give an LFW-style pairs.txt")
    if cfg.pretrained or cfg.pretrained_weights:
        load_imagenet_weights(cfg.pretrained_weights)
    if cfg.init_from and not cfg.resume:
        from faceid.finetune import load_base

        load_base(
            build_model(embedding_size=cfg.embedding_size, neck=cfg.neck, img_size=cfg.img_size, dropout=cfg.dropout),
            cfg,
        )
