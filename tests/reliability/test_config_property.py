"""Property: no TrainConfig that validation accepts crashes the trainer at start.

Hypothesis draws configs over every field of TrainConfig, most across their whole validated range
(see COST_BOUNDED for the few held small to keep this fast), and runs the real
`faceid.trainer.Trainer` on a tiny dataset: setup (data, model, objective, optimizer, scheduler),
one training step (the stop event is set, as SIGTERM would), the evaluation and the end of run.
Allowed outcomes: it finishes, or it stops with a FaceIDError, i.e. the one-line message a user
gets (a device that is not there, fp16 on a CPU, a diverged loss, too little data for the
config). Anything else is a crash and fails the test.

Speed: the ResNet-50 trunk is replaced by a one-convolution stand-in with the same output (2048
features per image). Nothing in the trunk depends on the config, and a full ResNet-50 step costs
seconds on a small CPU (real-trunk runs: tests/test_train.py, test_faults_checkpoints.py). All
the rest is the real code: the embedding layer, the objective and its head, the optimizer groups,
freezing, channels_last, autocast, clipping, the scheduler, evaluation, thresholds and the
checkpoint dict (not written to disk; its config must be JSON). No worker processes, 32-40 px.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from core_fixtures import make_identity_folder
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

import faceid.checkpoint
import faceid.trainer
import faceid.trainer_setup
from faceid.config import TrainConfig
from faceid.errors import FaceIDError
from faceid.model import EmbeddingNet

# Always drawn, and held small: each unit costs time or memory. Larger values are valid and are
# not expected to fail, only to need the machine for it (the defaults img_size 224 and, in pair
# mode, 256 pairs = 512 images per step need tens of GB on a CPU; eval_pairs and pairs_per_epoch
# near their bound of 1e8 allocate gigabytes of pair indices; workers up to 256 start that many
# processes). The service reports a run the machine cannot hold as killed by the OOM killer.
COST_BOUNDED = {
    "img_size": st.integers(32, 40),
    "eval_pairs": st.integers(2, 2000),
    "pairs_per_epoch": st.integers(2, 64),
    "embedding_size": st.integers(2, 1024),
    "threads": st.integers(0, 2),
    "max_steps_per_epoch": st.integers(0, 3),
    # random pixels show no face: alignment is exercised in tests/test_faces.py
    "align": st.just("none"),
}

FIELDS = {
    "preset": st.none() | st.just("cpu-small"),
    "pairs_file": st.none() | st.just("pairs.txt"),
    "pairs_folds": st.none() | st.lists(st.integers(1, 3), min_size=1, max_size=3),
    "train_mode": st.sampled_from(["pair", "arcface"]),
    "arcface_s": st.floats(1e-6, 1024),
    "arcface_m": st.floats(0, 1.5707963),
    "easy_margin": st.booleans(),
    "margin_warmup_epochs": st.floats(0, 1000),
    "scale_logits": st.floats(1e-6, 1024),
    "freeze_backbone_epochs": st.integers(0, 5),
    "epochs": st.integers(1, 100_000),
    "batch_size": st.integers(2, 65536),
    "optimizer": st.sampled_from(["sgd", "adamw"]),
    "lr": st.floats(1e-12, 10),
    "weight_decay": st.floats(0, 1),
    "backbone_lr_scale": st.floats(0, 100),
    "scheduler": st.sampled_from(["cosine", "constant"]),
    "warmup_epochs": st.floats(0, 100_000),
    "clip_grad_norm": st.floats(0, 1e6),
    "balanced_sampling": st.booleans(),
    "augment": st.sampled_from(["none", "flip", "light"]),
    "neck": st.sampled_from(["gap", "flat"]),
    "crop": st.floats(0.3, 1.0),
    "dropout": st.floats(0, 0.99),
    "pretrained": st.booleans(),
    "eval_flip": st.booleans(),
    "best_metric": st.sampled_from(["acc", "auc", "tar_1e-2", "tar_1e-3", "pairs_acc", "pairs_auc"]),
    "device": st.sampled_from(["auto", "cpu", "cuda"]),
    "amp": st.sampled_from(["auto", "off", "bf16", "fp16"]),
    "channels_last": st.booleans(),
    "cache_images": st.sampled_from(["auto", "on", "off"]),
    "cache_max_gb": st.floats(0, 1024),
    "seed": st.integers(0, 2**32 - 1),
    "progress_step_pct": st.floats(1e-3, 100),
    "time_limit_min": st.floats(0, 1e6),
    "nproc_per_node": st.integers(1, 8),
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """train: 4 people x 3 images; val: 2 people x 2 images (LFW names) and a 2-fold pairs.txt."""
    root = tmp_path_factory.mktemp("property_data")
    make_identity_folder(root / "train", {f"p{i}": 3 for i in range(4)})
    for name in ("Ann_A", "Bob_B"):
        make_identity_folder(root / "val", {name: 0})
        for i in (1, 2):
            from core_fixtures import write_image

            write_image(root / "val" / name / f"{name}_{i:04d}.jpg", seed=i + len(name))
    (root / "val" / "pairs.txt").write_text("2\t1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\nBob_B\t1\t2\nBob_B\t2\tAnn_A\t2\n")
    return root


def tiny_trunk() -> nn.Module:
    """[B, 3, S, S] -> [B, 2048], like ResNet-50 without its classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2048),
    )


@pytest.fixture(scope="module")
def fast_trainer():
    """A stand-in trunk; no checkpoint files."""
    real_build, real_save = faceid.trainer_setup.build_model, faceid.checkpoint.save_checkpoint

    def build_model(*, embedding_size: int = 512, pretrained: bool = False, pretrained_weights=None, **_):
        if pretrained or pretrained_weights:
            return real_build(
                embedding_size=embedding_size, pretrained=pretrained, pretrained_weights=pretrained_weights
            )
        return EmbeddingNet(embedding_size, trunk=tiny_trunk())

    def save_checkpoint(obj, path):
        json.dumps(obj["config"], allow_nan=False)
        assert all(torch.is_tensor(v) for v in obj["model"].values())
        Path(path).touch()
        return Path(path)

    faceid.trainer_setup.build_model, faceid.checkpoint.save_checkpoint = build_model, save_checkpoint
    yield
    faceid.trainer_setup.build_model, faceid.checkpoint.save_checkpoint = real_build, real_save


def test_accepted_configs_do_not_crash_the_trainer(tiny_data, fast_trainer, tmp_path_factory):
    outcomes: dict[str, int] = {}
    messages: set[str] = set()
    threads = torch.get_num_threads()

    @settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(fields=st.fixed_dictionaries(COST_BOUNDED, optional=FIELDS))
    def check(fields):
        if fields.get("pairs_file"):
            fields["pairs_file"] = str(tiny_data / "val" / "pairs.txt")
        ckpt_dir = tmp_path_factory.mktemp("run")
        try:
            cfg = TrainConfig(
                train=str(tiny_data / "train"), val=str(tiny_data / "val"), ckpt_dir=str(ckpt_dir), workers=0, **fields
            )
        except ValidationError:
            reject()
        stop = threading.Event()
        stop.set()  # one step, then evaluate and finish, as after SIGTERM
        events: list[dict] = []
        try:
            result = faceid.trainer.Trainer(cfg, on_event=events.append, stop=stop).fit()
            outcome = "finished"
            assert result.best_epoch == 1 and (ckpt_dir / "backbone_best.pt").exists()
            assert [e["event"] for e in events][:2] == ["start", "progress"]
            assert events[-1]["event"] == "finished"
        except FaceIDError as e:
            outcome = type(e).__name__
            messages.add(f"{outcome}: {str(e)[:150]}")
            assert str(e) and "\n" not in str(e).strip(), str(e)
        finally:
            torch.set_num_threads(threads)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    check()
    print("outcomes", outcomes, *sorted(messages), sep="\n  ")
    assert outcomes.get("finished", 0) >= 8, outcomes
