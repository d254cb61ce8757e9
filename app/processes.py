"""Process and file utilities of the job runner: a training process's group, its exit, its
environment, whether a pid is still ours, and the tail of a log."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from faceid.omp import training_child_env


def tail_lines(path: Path, n: int, max_bytes: int = 4 << 20) -> list[str]:
    """The last `n` lines of a text file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first line was cut
    return lines[-n:] if n > 0 else []


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def describe_exit(rc: int, what: str = "the training process") -> str:
    """Why process `what` ended, from its return code (negative: the signal that killed it)."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = " (the out-of-memory killer does this)" if -rc == signal.SIGKILL else ""
        return f"{what} was killed by {name}{hint}"
    if rc == 143:
        return f"{what} was stopped by SIGTERM from outside the service"
    return f"{what} exited with code {rc}"


def child_env() -> dict[str, str]:
    """The server's environment minus its secrets and its own OpenMP wait default (training
    spins briefly instead, faceid/omp.py), with the faceid package importable and this process
    named as the trainer's runner (faceid.cli_train.watch_runner)."""
    env = training_child_env({k: v for k, v in os.environ.items() if k != "FACEID_API_KEY"})
    import faceid

    root = str(Path(faceid.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["FACEID_RUNNER_PID"] = str(os.getpid())  # the trainer stops when this process is gone
    return env


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_our_trainer(pid: int, config_path: Path) -> bool:
    """True when process `pid` still runs with this job's config file (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config_path).encode() in cmdline
