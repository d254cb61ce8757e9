"""faceid.checkpoint: weights-only round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

import faceid.checkpoint as ckmod
from faceid.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, save_checkpoint
from faceid.config import TrainConfig
from faceid.errors import CheckpointError


def _checkpoint(epoch: int = 3, **extra) -> dict:
    """A small checkpoint with every required key (a tiny state dict stands in for the model)."""
    torch.manual_seed(epoch)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": "resnet50",
        "embedding_size": 8,
        "img_size": 32,
        "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "config": TrainConfig(img_size=32, embedding_size=8).to_json_dict(),
        "epoch": epoch,
        "metrics": {"acc": 0.75, "th": 0.31, "auc": 0.8, "tar_1e-2": 0.1, "tar_1e-3": 0.05},
        "thresholds": {"acc": 0.31, "far_1e-2": 0.62, "far_1e-3": 0.7},
        "model": {"embed.0.weight": torch.randn(8, 16), "embed.1.num_batches_tracked": torch.tensor(5)},
        **extra,
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_weights_only(tmp_path):
    ck = _checkpoint(
        history=[{"epoch": 1, "acc": 0.5, "is_best": True, "margin": None}],
        best={"epoch": 1, "value": 0.5, "metric": "acc"},
        head=None,
        global_step=7,
    )
    path = save_checkpoint(ck, tmp_path / "sub" / "last.pt")  # creates the folder
    assert path == tmp_path / "sub" / "last.pt"
    _assert_same(ck, load_checkpoint(path))
    # the contract: any reader can use torch.load(weights_only=True) directly
    _assert_same(ck, torch.load(path, weights_only=True))


def test_no_temp_file_is_left(tmp_path):
    save_checkpoint(_checkpoint(1), tmp_path / "best.pt")
    save_checkpoint(_checkpoint(2), tmp_path / "best.pt")  # overwrite in place
    assert os.listdir(tmp_path) == ["best.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2


def test_a_failing_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_checkpoint(1), path)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a partial write...
        raise OSError(28, "No space left on device")  # ...then the disk fills up

    monkeypatch.setattr(ckmod.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_checkpoint(2), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the partial temp file is gone


def test_an_interrupted_save_cleans_up_too(tmp_path, monkeypatch):
    def interrupted(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_checkpoint(), tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def _load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _load_error(tmp_path / "nope.pt")


def test_a_folder_is_not_a_checkpoint(tmp_path):
    assert "not found" in _load_error(tmp_path)


def test_random_bytes(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(os.urandom(4096))
    assert "corrupt" in _load_error(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    assert "corrupt" in _load_error(p)


def test_truncated_checkpoint(tmp_path):
    p = save_checkpoint(_checkpoint(), tmp_path / "t.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert "corrupt" in _load_error(p)


def test_foreign_torch_file(tmp_path):
    p = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, p)
    msg = _load_error(p)
    assert "not a FaceID checkpoint" in msg and "faceid train" in msg


def test_a_tensor_alone_is_foreign(tmp_path):
    p = tmp_path / "t.pt"
    torch.save(torch.zeros(3), p)
    assert "not a FaceID checkpoint" in _load_error(p)


class _Pickled:
    """Arbitrary objects need full unpickling, which weights_only refuses (no code execution)."""

    def __init__(self):
        self.x = 1


def test_a_file_that_needs_unpickling_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": _Pickled()}, p)
    assert "weights-only" in _load_error(p)


def test_wrong_format_version(tmp_path):
    p = save_checkpoint(_checkpoint(format_version=99), tmp_path / "v99.pt")
    msg = _load_error(p)
    assert "version 99" in msg and f"version {FORMAT_VERSION}" in msg


def test_missing_keys(tmp_path):
    ck = _checkpoint()
    del ck["model"], ck["thresholds"]
    p = save_checkpoint(ck, tmp_path / "partial.pt")
    msg = _load_error(p)
    assert "model" in msg and "thresholds" in msg
