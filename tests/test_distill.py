"""Distillation from a teacher network (`distill dlib`): the teacher's descriptors and their cache,
the objective's extra loss, and runs that use it (a fresh one and a resumed one).

The teacher is an optional extra; the tests that run it are skipped where it is not installed
(scripts/setup.sh installs it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from core_fixtures import TINY, small_sample
from PIL import Image

from faceid import teacher as teacher_mod
from faceid.checkpoint import load_checkpoint
from faceid.config import TrainConfig
from faceid.errors import ConfigError
from faceid.objectives import ArcFaceObjective
from faceid.train import run

has_teacher = (
    importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
)
needs_teacher = pytest.mark.skipif(not has_teacher, reason="pip install 'faceid[teacher]'")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    train, val = small_sample(tmp_path_factory)
    return {"train": str(train), "val": str(val)}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(train_mode="arcface", embedding_size=16, arcface_m=0.3, **kw)


# -- the objective ---------------------------------------------------------------------------------


def test_objective_adds_the_weighted_distance_to_the_teacher():
    labels = np.array([0, 0, 1, 1, 2, 2])
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(6, 8)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    torch.manual_seed(0)
    plain = ArcFaceObjective(_cfg(batch_size=4), labels, 3)
    torch.manual_seed(0)
    both = ArcFaceObjective(_cfg(batch_size=4, distill="dlib", distill_weight=2.0), labels, 3, teacher)
    assert both.projection is not None and both.projection.weight.shape == (8, 16)
    # the batches carry each image's index beside its label
    for batch in both.epoch_batches(np.random.default_rng(1)):
        assert batch.target.shape == (len(batch.indices), 2)
        assert torch.equal(batch.target[:, 0], torch.from_numpy(labels[batch.indices]))
        assert torch.equal(batch.target[:, 1], torch.from_numpy(batch.indices.astype(np.int64)))
    emb = torch.randn(4, 16)
    idx = torch.tensor([0, 3, 4, 1])
    y = torch.from_numpy(labels)[idx]
    ce = plain(emb, y)
    total = both(emb, torch.stack([y, idx], dim=1))
    mapped = both.projection(torch.nn.functional.normalize(emb, dim=1))
    centred = torch.from_numpy(teacher - teacher.mean(axis=0))
    gap = 1 - torch.nn.functional.cosine_similarity(mapped, centred[idx], dim=1)
    assert torch.allclose(total, ce + 2.0 * gap.mean(), atol=1e-5)
    total.backward()
    assert both.projection.weight.grad is not None and both.projection.weight.grad.abs().sum() > 0


def test_objective_refuses_descriptors_that_do_not_match_the_images():
    with pytest.raises(ValueError, match="3 teacher descriptors for 4 training images"):
        ArcFaceObjective(_cfg(distill="dlib"), np.array([0, 0, 1, 1]), 2, np.zeros((3, 8), np.float32))


def test_distill_needs_the_arcface_loss():
    with pytest.raises(ValueError, match="set train_mode arcface"):
        TrainConfig(train_mode="pair", distill="dlib")


def test_a_missing_teacher_is_a_config_error_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'faceid\[teacher\]'"):
        teacher_mod.check_teacher("dlib")
    teacher_mod.check_teacher("none")  # nothing needed


def test_a_run_without_the_teacher_fails_before_decoding(folders, tmp_path, monkeypatch):
    def missing(name: str) -> None:
        raise ConfigError("distill dlib: the package dlib is not installed; pip install 'faceid[teacher]'")

    monkeypatch.setattr("faceid.trainer_setup.check_teacher", missing)
    cfg = TrainConfig(**folders, ckpt_dir=str(tmp_path / "run"), train_mode="arcface", distill="dlib", **TINY)
    with pytest.raises(ConfigError, match="faceid\\[teacher\\]"):
        run(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- the teacher and its cache ---------------------------------------------------------------------


@needs_teacher
def test_descriptors_are_unit_vectors_that_tell_people_apart_and_are_cached(folders, tmp_path, monkeypatch):
    train = Path(folders["train"])
    people = sorted(d for d in train.iterdir())[:3]
    paths = [f for d in people for f in sorted(d.glob("*.jpg"))[:3]]
    who = np.repeat(np.arange(3), 3)
    cache = tmp_path / "cache"
    v = teacher_mod.teacher_vectors(paths, workers=0, folder=cache)
    assert v.shape == (9, teacher_mod.TEACHER_DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # a real face descriptor, not noise: about their mean, one person's photos point one way
    c = v - v.mean(axis=0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    sim = c @ c.T
    same = sim[(who[:, None] == who[None, :]) & ~np.eye(9, dtype=bool)]
    other = sim[who[:, None] != who[None, :]]
    assert same.min() > other.max()

    # a second call reads every descriptor back from the cache
    def no_compute(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(teacher_mod, "_DescribeFiles", no_compute)
    assert np.array_equal(teacher_mod.teacher_vectors(paths, workers=0, folder=cache), v)
    monkeypatch.undo()

    # a copy elsewhere is the same photo: read back too; a changed file is described again, alone
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(paths[0].read_bytes())
    described: list[Path] = []
    real = teacher_mod._DescribeFiles

    class Counting(real):  # type: ignore[valid-type, misc]
        def __getitem__(self, i: int):
            described.append(self.paths[i])
            return super().__getitem__(i)

    monkeypatch.setattr(teacher_mod, "_DescribeFiles", Counting)
    assert np.array_equal(teacher_mod.teacher_vectors([copy], workers=0, folder=cache)[0], v[0])
    assert described == []
    Image.open(paths[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copy, quality=90)
    again = teacher_mod.teacher_vectors(paths[:3] + [copy], workers=0, folder=cache)
    assert described == [copy]
    assert np.array_equal(again[:3], v[:3])
    assert float(again[3] @ v[3]) > float(again[3] @ v[0])  # the mirror image of the person in paths[3]


@needs_teacher
def test_a_run_distills_and_resumes_with_its_projection(folders, tmp_path):
    base = dict(folders, train_mode="arcface", distill="dlib", distill_weight=3.0, **TINY)
    events: list[dict] = []
    result = run(TrainConfig(**base, ckpt_dir=str(tmp_path / "run"), epochs=1), on_event=events.append)
    last = load_checkpoint(result.last_checkpoint)
    assert last["config"]["distill"] == "dlib"
    proj = last["projection"]["weight"]
    assert proj.shape == (teacher_mod.TEACHER_DIM, TINY.get("embedding_size", 512))
    # the best checkpoint is the served model alone: nothing of the teacher in it
    best = load_checkpoint(Path(result.best_checkpoint))
    assert "projection" not in best and "projection" not in str(list(best["model"]))
    # a resume takes the projection back and trains it on
    run(TrainConfig(**base, ckpt_dir=str(tmp_path / "run"), epochs=2, resume=result.last_checkpoint))
    after = load_checkpoint(result.last_checkpoint)
    assert after["epoch"] == 2
    assert not torch.equal(after["projection"]["weight"], proj)
    # a resume without distill does not fit the optimizer's state: refused with the reason
    with pytest.raises(ConfigError, match="distill"):
        run(
            TrainConfig(
                **{**base, "distill": "none"},
                ckpt_dir=str(tmp_path / "run"),
                epochs=3,
                resume=result.last_checkpoint,
            )
        )


@needs_teacher
def test_prepare_computes_the_descriptors_ahead(folders, tmp_path, monkeypatch, capsys):
    from faceid.cli import main

    monkeypatch.setenv("FACEID_CACHE_DIR", str(tmp_path / "cache"))
    train = Path(folders["train"])
    assert main(["prepare", str(train), "--workers", "0", "--distill", "dlib"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert Path(out[-1]["teacher_cache"]).is_file()
    paths = sorted(train.glob("*/*.jpg"))

    def no_compute(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(teacher_mod, "_DescribeFiles", no_compute)
    assert teacher_mod.teacher_vectors(paths, workers=0).shape == (len(paths), teacher_mod.TEACHER_DIM)


def test_prepare_without_the_teacher_is_one_line_naming_the_install(folders, monkeypatch, capsys):
    from faceid.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    assert main(["prepare", folders["train"], "--distill", "dlib"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'faceid[teacher]'" in err[0]
