"""The learning-rate schedule and the margin warm-up, by steps and under a time limit.

The time-limit tests run the real trainer on a clock that advances one second each time the
trainer reads it, so where a run stops, and its learning rate then, do not depend on this machine's
speed.
"""

from __future__ import annotations

import math

import pytest
from core_fixtures import TINY, small_sample

from faceid.config import TrainConfig
from faceid.optimization import lr_lambda
from faceid.train import Trainer


def test_warmup_then_cosine_by_steps():
    cfg = TrainConfig(epochs=4, warmup_epochs=1)
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0)
    assert f(25) == pytest.approx(0.5)  # halfway through the 30 cosine steps
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    assert f(55) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0


def test_a_pace_ahead_of_the_steps_moves_the_schedule_on():
    cfg = TrainConfig(epochs=4, warmup_epochs=1)
    by_steps = lr_lambda(cfg, 10)
    ahead = lr_lambda(cfg, 10, pace=lambda step: step + 20.0)
    assert ahead(5) == pytest.approx(by_steps(25))
    assert ahead(20) == pytest.approx(0.0, abs=1e-12)
    constant = lr_lambda(TrainConfig(epochs=4, scheduler="constant"), 10, pace=lambda s: s + 100.0)
    assert constant(3) == 1.0


class FakeClock:
    """time.time() for faceid.trainer: one second later at every call."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_sample(tmp_path_factory)


def _run_with_limit(data, tmp_path, monkeypatch, **overrides):
    train, val = data
    monkeypatch.setattr("faceid.trainer.time", FakeClock())
    # 30 epochs x 2 steps would take far longer than the 60 (fake) seconds of the limit.
    cfg = TrainConfig(
        **{
            **TINY,
            "train": str(train),
            "val": str(val),
            "ckpt_dir": str(tmp_path / "m"),
            "train_mode": "arcface",
            "epochs": 30,
            "warmup_epochs": 1,
            "arcface_m": 0.3,
            "margin_warmup_epochs": 20,
            "lr": 0.01,
            "time_limit_min": 1.0,
            **overrides,
        }
    )
    lrs, margins = [], []
    trainer = Trainer(cfg)
    trainer.setup()
    set_progress = trainer.objective.set_progress

    def spy(epochs_done):
        set_progress(epochs_done)
        margins.append(trainer.objective.head.m)
        lrs.append(trainer.optimizer.param_groups[1]["lr"])

    trainer.objective.set_progress = spy
    result = trainer.fit()
    lrs.append(trainer.optimizer.param_groups[1]["lr"])  # after the last step
    return trainer, result, lrs, margins


def test_time_limit_fits_the_cosine_and_margin_warmup_into_the_limit(data, tmp_path, monkeypatch):
    trainer, result, lrs, margins = _run_with_limit(data, tmp_path, monkeypatch)
    steps = trainer.state.global_step
    assert result.stopped_early and steps < trainer.total_steps / 2, (steps, trainer.total_steps)
    # The schedule ran on the time share: the learning rate reached (nearly) 0 by the limit,
    # after rising, and the margin reached arcface_m, though most planned steps never ran.
    assert max(lrs) == pytest.approx(0.01, rel=0.05)
    assert lrs[-1] < 0.01 * 0.02, lrs
    assert margins[-1] == pytest.approx(0.3, abs=0.02) and margins[0] < 0.05
    rec = result.history[-1]
    assert rec["margin"] == pytest.approx(0.3, abs=0.02) and rec["lr"] == pytest.approx(lrs[-1])


def test_fit_to_time_limit_false_keeps_the_schedule_on_steps(data, tmp_path, monkeypatch):
    trainer, result, lrs, margins = _run_with_limit(data, tmp_path, monkeypatch, fit_to_time_limit=False)
    steps = trainer.state.global_step
    assert result.stopped_early and steps < trainer.total_steps / 2
    # Cut off by the limit: the cosine had barely started, the margin was still rising.
    total, warm = trainer.total_steps, trainer.steps_per_epoch
    expected = 0.5 * (1 + math.cos(math.pi * (steps - warm) / (total - warm)))
    assert lrs[-1] == pytest.approx(0.01 * expected, rel=1e-6) and lrs[-1] > 0.005
    assert margins[-1] < 0.3 * steps / (20 * warm) + 0.01


def test_no_time_limit_means_steps_only(data, tmp_path, monkeypatch):
    trainer, result, lrs, _ = _run_with_limit(
        data, tmp_path, monkeypatch, time_limit_min=0.0, epochs=2, margin_warmup_epochs=1
    )
    assert not result.stopped_early and trainer.state.global_step == trainer.total_steps == 4
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
