"""Turn a POST /jobs body into the config a training process may run.

Data paths in a request are relative to the data root. They are resolved with every symbolic link
followed and must still lie inside the root afterwards, so neither `..`, an absolute path nor a
link planted in the data folder can make a job read (or report on) files elsewhere. The service
owns where a job writes: `ckpt_dir` is the job's folder and `resume` is set only by
POST /jobs/{id}/resume.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

from faceid.config import TrainConfig
from faceid.errors import ConfigError


class FieldError(ConfigError):
    """A request field that the service refuses; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# Fields that would let a request choose where a job writes, or reach other machines.
_SERVICE_MANAGED = {
    "ckpt_dir": "the service writes each job's checkpoints to its own folder (models/jobs/<id>/); leave ckpt_dir out",
    "resume": "resume a job with POST /jobs/{id}/resume; leave resume out",
}
_SINGLE_NODE = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id")
MAX_WORKERS = 64


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS says, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _resource_limits() -> dict[str, int]:
    """What one job may ask of this machine: a training process (each holds a whole model) and a
    compute thread per core, decoding workers up to MAX_WORKERS."""
    cpus = usable_cpus()
    return {"nproc_per_node": max(1, cpus), "threads": max(1, cpus), "workers": MAX_WORKERS}


def confine(root: Path, value: str, field: str, kind: Literal["dir", "file"], root_name: str = "the data root") -> Path:
    """Resolve `value` (relative to `root`) to an existing path inside `root`, links followed.

    Raises FieldError naming `field` when the value is absolute, contains `..`, does not exist,
    is of the wrong kind, or resolves outside `root`.
    """
    if not value or not value.strip():
        raise FieldError(field, f"is empty; give a path relative to {root_name}, for example 'sample/train'")
    if "\x00" in value:
        raise FieldError(field, "contains a NUL character")
    rel = PurePosixPath(value)
    if rel.is_absolute() or value.startswith("~") or "\\" in value:
        raise FieldError(
            field,
            f"{value!r} is not a relative path; give a path relative to "
            f"{root_name} ({root}), for example 'sample/train'",
        )
    if ".." in rel.parts:
        raise FieldError(field, f"{value!r} contains '..'; give a path inside {root_name} without '..'")
    try:
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise FieldError(
            field,
            f"{root_name} {root} does not exist; create it or set "
            "FACEID_DATA_DIR to the folder that holds your datasets",
        ) from None
    try:
        real = (real_root / rel).resolve(strict=True)
    except FileNotFoundError:
        raise FieldError(field, f"{value!r} does not exist in {root_name}; paths are relative to {root}") from None
    except (OSError, RuntimeError) as e:  # a link loop, a permission problem, a too-long name
        raise FieldError(field, f"{value!r} cannot be resolved ({type(e).__name__})") from None
    if not real.is_relative_to(real_root):
        raise FieldError(
            field,
            f"{value!r} resolves outside {root_name} (through a symbolic link); only data inside {root} can be used",
        )
    if kind == "dir" and not real.is_dir():
        raise FieldError(
            field, f"{value!r} is not a folder; give an ImageFolder root (one sub-folder of images per identity)"
        )
    if kind == "file" and not real.is_file():
        raise FieldError(field, f"{value!r} is not a file")
    return real


def confine_contents(root: Path, folder: Path, value: str, field: str) -> None:
    """The trainer reads `folder/<identity>/<image>` (faceid.data.scan_folder follows links): a
    symbolic link at either level must resolve inside `root` too. Only links are resolved, so an
    ordinary dataset costs one directory listing per identity. Raises FieldError naming the link."""
    real_root = root.resolve()

    def check(entry: os.DirEntry) -> None:
        if entry.is_symlink():
            try:
                target = Path(entry.path).resolve(strict=True)
            except (OSError, RuntimeError):
                return  # a broken link or a loop: the trainer skips it like any unreadable entry
            if not target.is_relative_to(real_root):
                rel = Path(entry.path).relative_to(folder)
                raise FieldError(
                    field,
                    f"{value!r} holds {str(rel)!r}, a symbolic link that resolves "
                    f"outside the data root; only data inside {root} can be used",
                )

    def is_dir(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()  # follows a link, which check() found inside the root
        except OSError:  # a link loop
            return False

    try:
        with os.scandir(folder) as identities:
            for identity in identities:
                check(identity)
                if is_dir(identity):
                    with os.scandir(identity.path) as images:
                        for image in images:
                            check(image)
    except OSError as e:
        raise FieldError(field, f"{value!r} cannot be read ({e.strerror or type(e).__name__})") from None


def _confine_weights(value: str, data_dir: Path, models_dir: Path) -> Path:
    """pretrained_weights may live in the data root or in the models folder."""
    first: Optional[FieldError] = None
    for root, name in ((data_dir, "the data root"), (models_dir, "the models folder")):
        try:
            return confine(root, value, "pretrained_weights", "file", root_name=name)
        except FieldError as e:
            first = first or e
    assert first is not None
    raise first


def base_checkpoint(cfg: TrainConfig, base_job: Optional[dict[str, Any]]) -> tuple[TrainConfig, Path]:
    """The config of a job that fine-tunes, and the model it starts from: `cfg.init_from` names a
    job (`base_job`, None when there is no such job), which must have succeeded with a checkpoint.
    The settings that job's model fixes fill the fields the body left out (or a preset filled);
    one set otherwise must agree with it. FieldError otherwise."""
    from faceid.config import PRESETS
    from faceid.finetune import FIXED, check_fits, inherit

    if base_job is None:
        raise FieldError(
            "init_from",
            f"{cfg.init_from!r} is not a job of this server; give the id of a "
            "succeeded job (GET /jobs?status=succeeded)",
        )
    ckpt = base_job.get("checkpoint")
    if base_job["status"] != "succeeded" or not ckpt or not Path(ckpt).is_file():
        raise FieldError(
            "init_from",
            f"job {base_job['id']} is {base_job['status']} and has no model to start "
            "from; give the id of a succeeded job",
        )
    given = {k: getattr(cfg, k) for k in cfg.model_fields_set}
    preset = PRESETS.get(cfg.preset or "", {})
    for k in FIXED:  # a preset's value yields to the base's, as on the command line
        if k in preset and given.get(k) == preset[k]:
            given.pop(k)
    try:
        cfg = TrainConfig(**inherit(given, base_job["config"]))
        check_fits(cfg, base_job["config"], f"job {base_job['id']}")
    except ConfigError as e:
        raise FieldError("init_from", str(e)) from None
    except ValueError as e:  # what the base brings makes an invalid config (pydantic's ValidationError)
        raise FieldError("init_from", " ".join(str(e).split())) from None
    return cfg, Path(ckpt)


def job_config(
    cfg: TrainConfig, *, data_dir: Path, models_dir: Path, job_dir: Path, init_from: Optional[Path] = None
) -> dict[str, Any]:
    """The config (a JSON dict) the training process of a new job runs with: data paths resolved
    and confined, ckpt_dir set to the job folder, init_from the base job's checkpoint
    (`base_checkpoint`). Raises FieldError for a refused field."""
    for name, why in _SERVICE_MANAGED.items():
        if name in cfg.model_fields_set and getattr(cfg, name) not in (None, ""):
            raise FieldError(name, f"is set by the service: {why}")
    if cfg.nnodes != 1 or cfg.node_rank != 0 or cfg.rdzv_endpoint or cfg.rdzv_id:
        bad = next(n for n in _SINGLE_NODE if n in cfg.model_fields_set)
        raise FieldError(
            bad,
            "multi-node training is not started through the API; run "
            "`faceid train` under torchrun on each node instead",
        )
    for name, limit in _resource_limits().items():
        if getattr(cfg, name) > limit:
            raise FieldError(
                name,
                f"{getattr(cfg, name)} is more than this server allows ({limit}: "
                f"{'one per CPU core' if name != 'workers' else 'the service maximum'}); "
                f"ask for at most {limit}",
            )
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise FieldError("device", "is cuda, and this server has no usable CUDA GPU; use auto or cpu")
    if cfg.nproc_per_node > 1:
        from faceid.runtime import gpu_shortage  # torch: only for a multi-process job

        problem = gpu_shortage(cfg.device, cfg.nproc_per_node)
        if problem:
            raise FieldError("nproc_per_node", problem)
    out = cfg.to_json_dict()
    for name in ("train", "val"):
        folder = confine(data_dir, getattr(cfg, name), name, "dir")
        confine_contents(data_dir, folder, getattr(cfg, name), name)
        out[name] = str(folder)
    if cfg.pairs_file is not None:
        out["pairs_file"] = str(confine(data_dir, cfg.pairs_file, "pairs_file", "file"))
    if cfg.pretrained_weights is not None:
        out["pretrained_weights"] = str(_confine_weights(cfg.pretrained_weights, data_dir, models_dir))
    out["init_from"] = str(init_from) if init_from is not None else None
    out["ckpt_dir"] = str(job_dir)
    out["resume"] = None
    # Round-trip through the model so the stored config is one the trainer accepts.
    return TrainConfig.model_validate(out).to_json_dict()
