"""Service settings: a pydantic model, read from the environment by `load_settings()` (never at import).

Every setting has a `FACEID_*` variable; docs/SERVICE.md has the table. Values are checked here so
a wrong one stops the server at start with a message that names the variable and the fix, instead
of failing at the first request or the first job.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from faceid.database import is_postgres_url, redact
from faceid.errors import ConfigError
from faceid.images import decoder_max_pixels

ENV_PREFIX = "FACEID_"


class Settings(BaseModel):
    """The service's settings. Each field `name` is the variable FACEID_<NAME> (docs/SERVICE.md),
    except `poll_interval_s`, which only tests change. Building one never reads the environment;
    `load_settings` does."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    # repr=False: the key must never reach a log line or an error message.
    api_key: Optional[str] = Field(None, repr=False, min_length=8)
    public_docs: bool = False
    max_upload_mb: float = Field(10.0, ge=0.001, le=1024, allow_inf_nan=False)
    max_pixels: int = Field(40_000_000, ge=1024, le=1_000_000_000)  # faceid.images.DEFAULT_MAX_PIXELS
    checkpoint: Optional[Path] = None
    device: str = "auto"
    batch_max_size: int = Field(16, ge=1, le=1024)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000, allow_inf_nan=False)
    infer_workers: int = Field(
        0, ge=0, le=64
    )  # forward passes run at once; 0: app.model_manager.inference_plan decides
    compile: Literal["off", "freeze", "cudagraph"] = "off"  # faceid.inference.COMPILE_MODES
    # Extra server processes answering /embed and /verify on infer_port (app/replicas.py); 0: none.
    infer_replicas: int = Field(0, ge=0, le=64)
    infer_port: Optional[int] = Field(None, ge=0, le=65535)
    infer_host: str = "127.0.0.1"
    port: Optional[int] = Field(None, ge=1, le=65535)  # the main server's, when known: infer_port must differ
    max_queued_jobs: int = Field(100, ge=1, le=100_000)
    cancel_grace_s: float = Field(30.0, ge=0, le=3600, allow_inf_nan=False)
    # Whether `faceid serve` runs jobs itself; 0: an API only, `faceid worker` processes run them.
    run_jobs: bool = True
    # all: the whole service; inference: a stateless server of /embed, /embed/batch, /verify,
    # /health and /ready that follows the model the API server serves (app/replica_app.py)
    role: Literal["all", "inference"] = "all"
    # A running job whose worker renewed no heartbeat for this long is marked interrupted (the
    # worker renews it every third of it).
    worker_lease_s: float = Field(30.0, ge=1, le=86_400, allow_inf_nan=False)
    # Where jobs, the served-model record and galleries live: unset, SQLite files in models_dir; a
    # postgresql:// URL, that PostgreSQL database (shared by servers and workers on several hosts).
    # repr=False: the URL may carry a password.
    database_url: Optional[str] = Field(None, repr=False)
    poll_interval_s: float = 0.5
    # The training entry point as an argument list (a string is split as a shell would split it);
    # the runner appends `--config FILE --events_file FILE`. Tests point it at a fake trainer.
    trainer_cmd: tuple[str, ...] = (sys.executable, "-m", "faceid.train")

    @field_validator("device", "compile", "role", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("infer_host", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("infer_port", mode="before")
    @classmethod
    def _zero_is_unset(cls, value: Any) -> Any:
        return None if str(value).strip() == "0" else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("max_pixels")
    @classmethod
    def _decodable(cls, value: int) -> int:
        limit = decoder_max_pixels()
        if value > limit:
            raise ValueError(
                f"is above the {limit:,} pixels the image decoder (Pillow) accepts, so it would not "
                f"take effect; use at most {limit}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not is_postgres_url(value.strip()):
            raise ValueError(
                "is not a PostgreSQL URL; use postgresql://USER:PASSWORD@HOST:5432/DATABASE, or unset it to keep "
                "the SQLite files in the models folder"
            )
        return None if value is None else value.strip()

    @field_validator("trainer_cmd", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return tuple(shlex.split(value)) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        p = ENV_PREFIX
        if self.compile == "cudagraph" and self.device == "cpu":
            raise ConfigError(
                f"{p}COMPILE=cudagraph needs a CUDA GPU and {p}DEVICE is cpu; use {p}COMPILE=off or freeze on a CPU"
            )
        if self.infer_replicas and self.infer_port is None:
            raise ConfigError(
                f"{p}INFER_REPLICAS={self.infer_replicas} needs {p}INFER_PORT, the port the replicas "
                f"answer /embed and /verify on (not the main server's port); or set {p}INFER_REPLICAS=0"
            )
        if self.infer_replicas and not hasattr(socket, "send_fds"):
            raise ConfigError(
                f"{p}INFER_REPLICAS needs a system that passes sockets between processes (Linux or "
                f"macOS); set {p}INFER_REPLICAS=0 here"
            )
        if self.role == "inference" and self.infer_replicas:
            raise ConfigError(
                f"{p}INFER_REPLICAS={self.infer_replicas} with {p}ROLE=inference: an inference server has no "
                f"replicas of its own; start more inference servers instead, or set {p}INFER_REPLICAS=0"
            )
        if self.infer_port is not None and self.infer_port == self.port:
            raise ConfigError(
                f"{p}INFER_PORT={self.infer_port} is the main server's port ({p}PORT); give the "
                "replicas a port of their own, for example one above it"
            )
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def jobs_dir(self) -> Path:
        return self.models_dir / "jobs"

    @property
    def db_path(self) -> Path:
        return self.models_dir / "jobs.db"

    @property
    def jobs_database(self) -> Union[str, Path]:
        """The job database: the PostgreSQL URL, else MODELS_DIR/jobs.db."""
        return self.database_url or self.db_path

    @property
    def galleries_database(self) -> Union[str, Path]:
        """The galleries' database: the PostgreSQL URL, else MODELS_DIR/galleries.db."""
        return self.database_url or self.models_dir / "galleries.db"


_ENV_FIELDS = tuple(name for name in Settings.model_fields if name != "poll_interval_s")


def _number(x: object) -> str:  # a bound from the field's Ge/Le metadata, or its default
    return str(x) if isinstance(x, int) else f"{x:g}"


def _message(err: ErrorDetails, env: Mapping[str, str]) -> str:
    """One pydantic error as a line that names the variable and the fix."""
    name = str(err["loc"][0]) if err["loc"] else ""
    var = ENV_PREFIX + name.upper()
    raw = env.get(var, err.get("input"))
    field = Settings.model_fields.get(name)
    kind = err["type"]
    if name == "database_url":  # never echo a password
        return f"{var}={redact(str(raw))!r} {err.get('ctx', {}).get('error', err['msg'])}"
    if name == "api_key":  # never echo the key
        return (
            f"{var} is too short ({len(str(raw))} characters); use at least 8, for example the output of "
            "`openssl rand -hex 24`"
        )
    if kind == "bool_parsing":
        return f"{var}={raw!r} is not a yes/no value; use 1 or 0"
    if kind == "literal_error":
        return f"{var}={raw!r} is not a mode; use {err['ctx']['expected'].replace(chr(39), '')}"
    if kind == "value_error":
        return f"{var}={raw!r} {err['ctx']['error']}"
    metadata = field.metadata if field else []
    lo = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    hi = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    default = "unset" if field is None or field.default is None else _number(field.default)
    span = f" between {_number(lo)} and {_number(hi)}" if lo is not None and hi is not None else ""
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{var}={raw!r} is not a whole number; set it to a whole number{span} or unset it (default {default})"
    if kind in ("float_parsing", "float_type"):
        return f"{var}={raw!r} is not a number; set it to a number{span} or unset it (default {default})"
    if kind in ("greater_than_equal", "less_than_equal", "finite_number"):
        return f"{var}={raw!r} is out of range; use a value{span} (default {default})"
    return f"{var}={raw!r}: {err['msg']}"


def load_settings(env: Optional[Mapping[str, str]] = None, **given: Any) -> Settings:
    """Settings from FACEID_* variables in `env` (default: os.environ), an empty value meaning unset;
    `given` values (the `faceid serve` flags) win. Raises ConfigError naming the variable and the fix."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for name in _ENV_FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw.strip() != "":
            values[name] = raw
    values.update({k: v for k, v in given.items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as e:
        raise ConfigError(_message(e.errors(include_url=False)[0], env)) from None


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
        raise ConfigError(
            f"the models folder {models} is not writable ({e.strerror or e}); point "
            f"{ENV_PREFIX}MODELS_DIR at a folder this user can write, or fix its "
            "permissions"
        ) from None
    data = settings.data_dir.expanduser().absolute()
    return settings.model_copy(update={"models_dir": models, "data_dir": data})
