"""Recipe options: label smoothing of the ArcFace cross-entropy, a moving average of the weights
(--ema_decay) that is what gets evaluated and saved, and the compiled training step
(--compile_step)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_fixtures import TINY, small_sample

from faceid.checkpoint import load_checkpoint
from faceid.config import TrainConfig
from faceid.errors import ConfigError
from faceid.objectives import ArcFaceObjective
from faceid.train import run


def test_label_smoothing_is_the_cross_entropy_of_the_arcface_logits_with_smoothing():
    labels = np.array([0, 1, 2, 0, 1, 2])
    emb, target = torch.randn(6, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = {}
    for eps in (0.0, 0.2):
        cfg = TrainConfig(embedding_size=16, label_smoothing=eps, margin_warmup_epochs=0)
        torch.manual_seed(0)
        objective = ArcFaceObjective(cfg, labels, 3)
        logits = objective.head(emb, target)
        assert torch.allclose(objective(emb, target), F.cross_entropy(logits, target, label_smoothing=eps))
        losses[eps] = float(objective(emb, target).detach())
    assert losses[0.2] != losses[0.0]


def _config(tmp_path_factory, name: str, **overrides) -> TrainConfig:
    train, val = small_sample(tmp_path_factory)
    return TrainConfig(
        train=str(train),
        val=str(val),
        ckpt_dir=str(tmp_path_factory.mktemp(name)),
        train_mode="arcface",
        **{**TINY, "max_steps_per_epoch": 3, **overrides},
    )


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(state.items()) if v.is_floating_point()])


def test_ema_is_what_is_evaluated_and_saved_and_a_resume_goes_on_averaging(tmp_path_factory):
    cfg = _config(tmp_path_factory, "ema", epochs=1, ema_decay=0.5)
    result = run(cfg)
    last = load_checkpoint(f"{cfg.ckpt_dir}/last.pt")
    best = load_checkpoint(result.best_checkpoint)
    assert last["ema"]["n_averaged"] == last["global_step"] == 3
    raw, average = _flat(last["model"]), _flat(last["ema"]["model"])
    assert not torch.allclose(raw, average)  # the average lags the raw weights
    assert torch.equal(_flat(best["model"]), average)  # the one epoch's best is the average
    # resumed for two more epochs: the average goes on from the saved one, not from the raw weights
    more = cfg.model_copy(update={"epochs": 3, "resume": f"{cfg.ckpt_dir}/last.pt"})
    run(more)
    after = load_checkpoint(f"{cfg.ckpt_dir}/last.pt")
    assert after["ema"]["n_averaged"] == after["global_step"] == 9
    assert not torch.allclose(_flat(after["ema"]["model"]), _flat(after["model"]))


def test_without_ema_last_pt_holds_no_average_and_the_best_is_the_raw_weights(tmp_path_factory):
    cfg = _config(tmp_path_factory, "no_ema", epochs=1)
    result = run(cfg)
    last = load_checkpoint(f"{cfg.ckpt_dir}/last.pt")
    assert "ema" not in last
    assert torch.equal(_flat(load_checkpoint(result.best_checkpoint)["model"]), _flat(last["model"]))


def test_the_moving_average_is_the_plain_mean_until_its_window_fills_then_exponential():
    from torch import nn
    from torch.optim.swa_utils import AveragedModel

    from faceid.trainer_setup import ema_update

    for decay, expected in ((0.9, 2.5), (0.5, 3.125)):  # window 10: the mean of 1..4; window 2: EMA
        net = nn.Linear(1, 1, bias=False)
        average = AveragedModel(net, multi_avg_fn=ema_update(decay), use_buffers=True)
        for value in (1.0, 2.0, 3.0, 4.0):
            with torch.no_grad():
                net.weight.fill_(value)
            average.update_parameters(net)
        assert float(average.module.weight.detach()) == expected


# --- compile_step -------------------------------------------------------------------------------


def _losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "progress"]


@pytest.mark.slow  # the compilation of ResNet-50's forward and backward takes about a minute on 2 cores
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_step_trains_as_the_eager_one(tmp_path_factory):
    runs = {}
    for compiled in (False, True):
        events: list[dict] = []
        cfg = _config(tmp_path_factory, f"compile-{compiled}", epochs=1, compile_step=compiled, amp="off")
        result = run(cfg, on_event=events.append)
        runs[compiled] = (_losses(events), result)
    eager, compiled = runs[False][0], runs[True][0]
    assert len(eager) == len(compiled) >= 2
    # the same batches from the same weights in fp32: the same losses up to the compiled kernels' rounding
    np.testing.assert_allclose(compiled, eager, rtol=2e-3)
    assert load_checkpoint(runs[True][1].best_checkpoint)["config"]["compile_step"] is True


def test_a_compilation_that_fails_is_a_config_error_naming_the_fix(tmp_path_factory, monkeypatch):
    def broken(module):
        def step(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return step

    monkeypatch.setattr(torch, "compile", broken)
    cfg = _config(tmp_path_factory, "compile-broken", epochs=1, compile_step=True)
    with pytest.raises(ConfigError, match=r"compile_step.*C\+\+ compiler.*compile_step false"):
        run(cfg)
