"""Service settings, read from the environment by `load_settings()` (never at import).

Every setting has a `FACEID_*` variable; docs/SERVICE.md has the table. Values are checked here so
a wrong one stops the server at start with a message that names the variable and the fix, instead
of failing at the first request or the first job.
"""

from __future__ import annotations

import math
import os
import shlex
import socket
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Optional

from faceid.errors import ConfigError
from faceid.images import decoder_max_pixels

ENV_PREFIX = "FACEID_"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    # repr=False: the key must never reach a log line or an error message.
    api_key: Optional[str] = field(default=None, repr=False)
    public_docs: bool = False
    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000  # faceid.images.DEFAULT_MAX_PIXELS
    checkpoint: Optional[Path] = None
    device: str = "auto"
    batch_max_size: int = 16
    batch_wait_ms: float = 5.0
    infer_workers: int = 0  # forward passes run at once; 0: app.serving.inference_plan decides
    compile: str = "off"  # faceid.inference.COMPILE_MODES
    # Extra server processes answering /embed and /verify on infer_port (app/replicas.py); 0: none.
    infer_replicas: int = 0
    infer_port: Optional[int] = None
    infer_host: str = "127.0.0.1"
    max_queued_jobs: int = 100
    cancel_grace_s: float = 30.0
    poll_interval_s: float = 0.5
    # The training entry point as an argument list; the runner appends
    # `--config FILE --events_file FILE`. Tests point it at a fake trainer.
    trainer_cmd: tuple[str, ...] = (sys.executable, "-m", "faceid.train")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def jobs_dir(self) -> Path:
        return self.models_dir / "jobs"

    @property
    def db_path(self) -> Path:
        return self.models_dir / "jobs.db"


def _number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float,
            integer: bool = False) -> float:
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not {kind}; set it to {kind} between "
                          f"{lo:g} and {hi:g} or unset it (default {default:g})") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is out of range; use a value between "
                          f"{lo:g} and {hi:g} (default {default:g})")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a yes/no value; use 1 or 0")


def load_settings(env: Optional[Mapping[str, str]] = None) -> Settings:
    """Build Settings from `env` (default: os.environ). Raises ConfigError on a bad value."""
    env = os.environ if env is None else env
    api_key = env.get(ENV_PREFIX + "API_KEY") or None
    if api_key is not None and len(api_key) < 8:
        raise ConfigError(f"{ENV_PREFIX}API_KEY is too short ({len(api_key)} characters); use at "
                          "least 8, for example the output of `openssl rand -hex 24`")
    device = (env.get(ENV_PREFIX + "DEVICE") or "auto").strip().lower()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"{ENV_PREFIX}DEVICE={device!r} is not a device; use auto, cpu, cuda or cuda:N")
    compile_mode = (env.get(ENV_PREFIX + "COMPILE") or "off").strip().lower()
    if compile_mode not in ("off", "freeze", "cudagraph"):
        raise ConfigError(f"{ENV_PREFIX}COMPILE={compile_mode!r} is not a mode; use off, freeze or cudagraph")
    if compile_mode == "cudagraph" and device == "cpu":
        raise ConfigError(f"{ENV_PREFIX}COMPILE=cudagraph needs a CUDA GPU and {ENV_PREFIX}DEVICE is cpu; use "
                          f"{ENV_PREFIX}COMPILE=off or freeze on a CPU")
    replicas = int(_number(env, "INFER_REPLICAS", 0, 0, 64, integer=True))
    infer_port = int(_number(env, "INFER_PORT", 0, 0, 65535, integer=True)) or None
    if replicas and infer_port is None:
        raise ConfigError(f"{ENV_PREFIX}INFER_REPLICAS={replicas} needs {ENV_PREFIX}INFER_PORT, the port the replicas "
                          f"answer /embed and /verify on (not the main server's port); or set {ENV_PREFIX}INFER_REPLICAS=0")
    if replicas and not hasattr(socket, "send_fds"):
        raise ConfigError(f"{ENV_PREFIX}INFER_REPLICAS needs a system that passes sockets between processes (Linux or "
                          f"macOS); set {ENV_PREFIX}INFER_REPLICAS=0 here")
    if infer_port is not None and (env.get(ENV_PREFIX + "PORT") or "").strip() == str(infer_port):
        raise ConfigError(f"{ENV_PREFIX}INFER_PORT={infer_port} is the main server's port ({ENV_PREFIX}PORT); give the "
                          "replicas a port of their own, for example one above it")
    max_pixels = int(_number(env, "MAX_PIXELS", 40_000_000, 1024, 1_000_000_000, integer=True))
    if max_pixels > decoder_max_pixels():
        raise ConfigError(f"{ENV_PREFIX}MAX_PIXELS={max_pixels} is above the {decoder_max_pixels():,} pixels the image "
                          f"decoder (Pillow) accepts, so it would not take effect; use at most {decoder_max_pixels()}")
    checkpoint = env.get(ENV_PREFIX + "CHECKPOINT") or None
    trainer = env.get(ENV_PREFIX + "TRAINER_CMD")
    return Settings(
        data_dir=Path(env.get(ENV_PREFIX + "DATA_DIR") or "data"),
        models_dir=Path(env.get(ENV_PREFIX + "MODELS_DIR") or "models"),
        api_key=api_key,
        public_docs=_flag(env, "PUBLIC_DOCS", False),
        max_upload_mb=_number(env, "MAX_UPLOAD_MB", 10.0, 0.001, 1024),
        max_pixels=max_pixels,
        checkpoint=Path(checkpoint) if checkpoint else None,
        device=device,
        batch_max_size=int(_number(env, "BATCH_MAX_SIZE", 16, 1, 1024, integer=True)),
        batch_wait_ms=_number(env, "BATCH_WAIT_MS", 5.0, 0, 10_000),
        infer_workers=int(_number(env, "INFER_WORKERS", 0, 0, 64, integer=True)),
        compile=compile_mode,
        infer_replicas=replicas,
        infer_port=infer_port,
        infer_host=(env.get(ENV_PREFIX + "INFER_HOST") or "127.0.0.1").strip(),
        max_queued_jobs=int(_number(env, "MAX_QUEUED_JOBS", 100, 1, 100_000, integer=True)),
        cancel_grace_s=_number(env, "CANCEL_GRACE_S", 30.0, 0, 3600),
        trainer_cmd=tuple(shlex.split(trainer)) if trainer else Settings.trainer_cmd,
    )


def prepare_dirs(settings: Settings) -> Settings:
    """Make the models folder (and its jobs/ folder) and prove it is writable; return the settings
    with both roots made absolute so that later changes of the working directory do not matter.
    Raises ConfigError naming the folder and the fix."""
    models = settings.models_dir.expanduser().absolute()
    try:
        (models / "jobs").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=models, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"the models folder {models} is not writable ({e.strerror or e}); point "
                          f"{ENV_PREFIX}MODELS_DIR at a folder this user can write, or fix its "
                          "permissions") from None
    data = settings.data_dir.expanduser().absolute()
    return replace(settings, models_dir=models, data_dir=data)
