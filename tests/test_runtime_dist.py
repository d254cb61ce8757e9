"""Which torch.distributed backend a multi-process run uses, and the clear error when a node has
fewer GPUs than processes (NCCL needs one GPU per process). A GPU host is simulated by patching
torch.cuda, so these run on any machine; tests/test_distributed.py runs real gloo jobs."""

from __future__ import annotations

import os

import pytest
import torch

from faceid import cli
from faceid.errors import ConfigError
from faceid.runtime import DistEnv, dist_backend, gpu_shortage


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize(
    "gpus,device,backend",
    [
        (0, "auto", "gloo"),
        (0, "cpu", "gloo"),
        (1, "auto", "nccl"),
        (1, "cuda", "nccl"),
        (1, "cpu", "gloo"),  # CPU processes on a GPU host: NCCL cannot carry CPU tensors
    ],
)
def test_backend_follows_the_device_the_run_computes_on(monkeypatch, gpus, device, backend):
    _gpus(monkeypatch, gpus)
    assert dist_backend(device) == backend


def test_a_gpu_per_process_or_a_message_that_names_the_fix(monkeypatch):
    _gpus(monkeypatch, 1)
    msg = gpu_shortage("auto", 2)
    assert msg is not None
    assert "2 processes on GPUs need 2 GPUs" in msg and "this machine has 1" in msg
    assert "1 or fewer" in msg and "cpu" in msg
    assert gpu_shortage("cuda", 3).startswith("3 processes")
    assert gpu_shortage("cpu", 8) is None  # gloo on CPUs: no GPU needed
    assert gpu_shortage("cuda", 1) is None
    _gpus(monkeypatch, 4)
    assert gpu_shortage("auto", 4) is None
    _gpus(monkeypatch, 0)
    assert gpu_shortage("auto", 2) is None  # auto on a CPU host runs on CPUs


def test_the_cli_refuses_before_launching_torchrun(monkeypatch, capsys, tmp_path):
    _gpus(monkeypatch, 1)
    launched = []
    monkeypatch.setattr(os, "execv", lambda *a: launched.append(a))
    rc = cli.main(
        [
            "train",
            "--train",
            str(tmp_path),
            "--val",
            str(tmp_path),
            "--nproc_per_node",
            "2",
            "--device",
            "cuda",
            "--ckpt_dir",
            str(tmp_path / "ckpt"),
        ]
    )
    assert rc == cli.EXIT_USER_ERROR and not launched
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --nproc_per_node: 2 processes on GPUs need 2 GPUs"), err


def test_torchrun_started_by_hand_gets_the_same_error_in_each_rank(monkeypatch):
    _gpus(monkeypatch, 1)
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    inits = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: inits.append(kw))
    with pytest.raises(ConfigError, match="2 processes on GPUs need 2 GPUs"):
        DistEnv.from_env("auto")
    assert not inits
    env = DistEnv.from_env("cpu")  # the same job on CPUs joins over gloo
    assert inits == [{"backend": "gloo"}] and (env.rank, env.world_size) == (1, 2)
