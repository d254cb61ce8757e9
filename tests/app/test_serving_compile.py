"""FACEID_COMPILE=freeze in the production loader: every batch size is compiled before the model is
served, and a compilation that fails is a clear load error (the current model stays)."""

from __future__ import annotations

from pathlib import Path

import pytest

import faceid.inference
from app.model_manager import load_verifier
from faceid.errors import CheckpointError


class FakeVerifier:
    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.warmed: list[int] = []

    def warmup(self, max_images: int) -> int:
        if self.fail:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        self.warmed.append(max_images)
        return 3


@pytest.mark.parametrize("mode,warmed", [("off", []), ("freeze", [8])])
def test_loader_warms_up_only_when_compiling(monkeypatch, mode, warmed):
    fake = FakeVerifier(fail=False)
    seen = {}

    def from_checkpoint(path, device, compile):
        seen.update(path=path, device=device, compile=compile)
        return fake

    monkeypatch.setattr(faceid.inference.Verifier, "from_checkpoint", staticmethod(from_checkpoint))
    assert load_verifier(Path("m.pt"), "cpu", compile=mode, max_batch=8) is fake
    assert seen == {"path": Path("m.pt"), "device": "cpu", "compile": mode} and fake.warmed == warmed


def test_failed_compilation_names_the_setting_to_change(monkeypatch):
    monkeypatch.setattr(
        faceid.inference.Verifier,
        "from_checkpoint",
        staticmethod(lambda path, device, compile: FakeVerifier(fail=True)),
    )
    with pytest.raises(
        CheckpointError,
        match=r"FACEID_COMPILE=freeze failed .*No working C\+\+ compiler found\); "
        r"set FACEID_COMPILE=off",
    ):
        load_verifier(Path("m.pt"), "cpu", compile="freeze", max_batch=4)
