"""Where a run executes: device, mixed precision, compute threads, and torch.distributed."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

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
    def from_env(cls, device: str = "auto") -> "DistEnv":
        """Join the torchrun job this process belongs to (if any) for a run on `device` (the
        --device value): NCCL when it runs on GPUs, gloo when on CPUs, also on a GPU host."""
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        env = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), ws)
        if ws > 1 and not torch.distributed.is_initialized():
            backend = dist_backend(device)
            if backend == "nccl":
                local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), env.local_rank + 1)
                problem = gpu_shortage(device, local)
                if problem:
                    raise ConfigError(f"torchrun's nproc_per_node: {problem}")
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

    def wrap(self, module: torch.nn.Module, device: torch.device, key: Any, ddp: Optional[Any] = None) -> Any:
        """DDP around `module` in a multi-process run (else `module` itself). `ddp`, that of an
        earlier call, is kept while `key` (what is trainable) is the same, else rebuilt."""
        if self.world_size == 1:
            return module
        if ddp is not None and getattr(ddp, "_faceid_key", None) == key:
            return ddp
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        ddp = DDP(module, device_ids=ids)
        ddp._faceid_key = key
        return ddp

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def runs_on_gpu(device: str) -> bool:
    """Whether a run with this --device value computes on a CUDA GPU here."""
    return device != "cpu" and torch.cuda.is_available()


def dist_backend(device: str) -> str:
    """torch.distributed's backend for a multi-process run on `device`: NCCL between GPUs, gloo
    between CPU processes (--device cpu on a GPU host included: NCCL cannot carry CPU tensors)."""
    return "nccl" if runs_on_gpu(device) else "gloo"


def gpu_shortage(device: str, nproc_per_node: int) -> Optional[str]:
    """Why `nproc_per_node` processes on `device` cannot each have a GPU of their own on this
    node (NCCL needs one per process), or None when they can or the run is on CPUs."""
    if nproc_per_node <= 1 or not runs_on_gpu(device):
        return None
    gpus = torch.cuda.device_count()
    if nproc_per_node <= gpus:
        return None
    return (
        f"{nproc_per_node} processes on GPUs need {nproc_per_node} GPUs on each node (one per "
        f"process) and this machine has {gpus}; ask for {gpus} or fewer, or set the device to "
        f"cpu to train them on CPUs (gloo)"
    )


def resolve_device(name: str, dist: Optional[DistEnv] = None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is usable here; use --device auto or cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank if dist else 0)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast pays
    off (bench/README.md, train_throughput).
    Without it oneDNN emulates bf16 and it is slower than fp32."""
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


# Measured on a 2-core CPU: one or two images (two or four views with eval_flip) embed faster
# and more steadily on one compute thread than on two (whose OpenMP threads can spend most of a
# pass in the kernel waking each other); from about 4 images on, two threads are as fast or faster.
# Face detection likewise: one or two photos are found faster on one thread (two 720x540 scenes
# in 48 against 60 ms, as a server's worker detects them between requests), four or more on two.
ONE_THREAD_MAX_IMAGES = 2


@contextlib.contextmanager
def compute_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with `n` torch compute threads (None: unchanged), then restore them."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(cfg, device: torch.device, *, cached: bool) -> int:
    """Pick torch's compute threads. On a small CPU a decoding worker that competes with the
    compute threads collapses throughput (OpenMP's threads wait for each other whenever one is
    descheduled), so leave one core per busy worker."""
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
