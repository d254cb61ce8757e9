"""Where a run executes: device, mixed precision, compute threads, and torch.distributed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from faceid.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """This process's place in a torchrun job (world_size 1 when not under torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistEnv":
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        env = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), ws)
        if ws > 1 and not torch.distributed.is_initialized():
            # NCCL between GPUs, gloo between CPU processes.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(env.local_rank)
            torch.distributed.init_process_group(backend=backend)
        return env

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of `values` over the ranks, the same list on every rank."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(name: str, dist: Optional[DistEnv] = None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is usable here; use --device "
                          "auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank if dist else 0)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast pays
    off (about 4.5x for ResNet-50 training on Zen 4). Without it oneDNN emulates bf16 and it is
    slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `--amp` on `device`, or None for full precision."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if mode == "fp16":
        raise ConfigError("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or --amp off")
    if mode == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def set_threads(cfg, device: torch.device, *, cached: bool) -> int:
    """Pick torch's compute threads. On a small CPU a decoding worker that competes with the
    compute threads collapses throughput (2 threads + 1 busy worker ran 4x slower than 1 thread
    on 2 cores, see README), so leave one core per busy worker."""
    if cfg.threads:
        n = cfg.threads
    elif device.type == "cuda":
        return torch.get_num_threads()
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = 0 if cached else cfg.workers
        n = max(1, cores - busy)
    n = max(1, n // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    log.info("torch compute threads: %d", n)
    return n
