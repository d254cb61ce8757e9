"""`faceid train` (and `python -m faceid.train`): the command line of a training run.

Training flags are generated from TrainConfig (one flag per field, same name and default), so the
CLI, the POST /jobs body and the checkpoint's stored config cannot drift apart. torch is imported
only once the arguments are valid; a multi-process run re-runs this command under torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from faceid.cli_common import EXIT_TERMINATED, Parser, UserError, setup_logging, user_error, validation_message
from faceid.config import TrainConfig
from faceid.events import Event, Failed, Finished, Progress, Start, parse_event
from faceid.omp import training_defaults
from faceid.preflight import check_before_launch, check_weight_files

log = logging.getLogger("faceid")


# --- TrainConfig -> argparse ----------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field. Defaults are SUPPRESSed so that only flags given on the
    command line override a --config file or a --preset."""
    group = parser.add_argument_group("training configuration (TrainConfig; also the POST /jobs body)")
    for name, f in TrainConfig.model_fields.items():
        tp = _unwrap_optional(f.annotation)
        assert f.description is not None  # every TrainConfig field has one
        # a description that explains its own default (pairs_folds: "default: all") keeps it alone
        help_ = f.description if "(default:" in f.description else f"{f.description} (default: {f.default})"
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_, "dest": name}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif typing.get_origin(tp) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = tp
            kw["metavar"] = {int: "N", float: "X", str: "VALUE"}.get(tp, "VALUE")
        group.add_argument(f"--{name}", **kw)


def config_from_args(ns: argparse.Namespace, config_file: Optional[str] = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if config_file:
        try:
            data = json.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise UserError(f"config file not found: {config_file}") from None
        except IsADirectoryError:
            raise UserError(f"--config {config_file} is a folder; give a JSON file of TrainConfig fields") from None
        except OSError as e:
            raise UserError(f"cannot read config file {config_file}: {e.strerror or type(e).__name__}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {config_file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {config_file} must hold a JSON object of TrainConfig fields")
    for name in TrainConfig.model_fields:
        if hasattr(ns, name):
            data[name] = getattr(ns, name)
    if getattr(ns, "pretrained", None) is False and data.get("pretrained_weights") is not None:
        raise UserError(
            "--pretrained_weights is given together with --no-pretrained; leave out --no-pretrained "
            "to start from these weights (a file implies --pretrained), or leave out "
            "--pretrained_weights to train from scratch"
        )
    if isinstance(data.get("init_from"), str):
        from faceid.finetune import base_config_of, inherit

        base = base_config_of(data["init_from"])
        data = inherit(data, base) if base is not None else data
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        raise UserError(validation_message(e)) from None


# --- the command -------------------------------------------------------------------------------


class EventWriter:
    """Renders training events: JSON lines to a file, and a progress bar (terminal) or log lines."""

    def __init__(self, events_file: Optional[str], quiet: bool = False) -> None:
        self.fh = None
        if events_file:
            try:
                Path(events_file).parent.mkdir(parents=True, exist_ok=True)
                self.fh = open(events_file, "a", buffering=1)
            except OSError as e:
                raise UserError(f"cannot write --events_file {events_file}: {e.strerror or e}") from None
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet

    def __call__(self, event: Event | dict[str, Any]) -> None:
        """One event: a model of faceid.events, or its JSON object (what Trainer's sink receives)."""
        ev = parse_event(event) if isinstance(event, dict) else event
        if self.fh:
            self.fh.write(json.dumps(ev.to_json(), default=str) + "\n")
            self.fh.flush()
        if self.quiet:
            return
        if isinstance(ev, Progress):
            eta = time.strftime("%H:%M:%S", time.gmtime(ev.eta_s))
            text = (
                f"epoch {ev.epoch}/{ev.epochs} step {ev.step}/{ev.steps} "
                f"loss {ev.loss:.4f} {ev.images_per_s:.1f} img/s lr {ev.lr:.2e} ETA {eta}"
            )
            if self.tty:
                width = 24
                done = int(width * ev.step / ev.steps)
                sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
                sys.stderr.flush()
                if ev.step == ev.steps:
                    sys.stderr.write("\n")
            else:
                log.info("%s", text)
        elif isinstance(ev, Start):
            log.info(
                "training on %s (amp %s): %s images of %s identities, %d steps per epoch",
                ev.device,
                ev.amp,
                ev.train_images,
                ev.train_identities,
                ev.steps_per_epoch,
            )
        elif isinstance(ev, Finished):
            log.info("best epoch %s: %s %.4f -> %s", ev.best_epoch, ev.best_metric, ev.best_value, ev.best_checkpoint)

    def close(self) -> None:
        if self.fh:
            self.fh.close()


def _launch_torchrun(cfg: TrainConfig, argv: list[str]) -> int:
    """Re-run this command under torchrun (torch.distributed.run) with the same arguments."""
    from faceid.runtime import gpu_shortage  # imports torch, which torchrun's processes do anyway

    problem = gpu_shortage(cfg.device, cfg.nproc_per_node)
    if problem:
        raise UserError(f"--nproc_per_node: {problem}")
    # what every process would fail alike: one line here, not N error lines and torchrun's traceback
    check_weight_files(cfg)
    check_before_launch(cfg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={cfg.nproc_per_node}",
        f"--nnodes={cfg.nnodes}",
    ]
    if cfg.nnodes == 1 and not cfg.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        if not cfg.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv_endpoint HOST:PORT (the same on every node)")
        cmd += [
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={cfg.rdzv_endpoint}",
            f"--rdzv_id={cfg.rdzv_id or 'faceid'}",
            f"--node_rank={cfg.node_rank}",
        ]
    cmd += ["-m", "faceid.train", *argv]
    log.info("launching: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)  # torchrun takes over this process; signals reach it directly
    return 1  # not reached


def build_train_parser(prog: str = "faceid train") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Train a ResNet-50 face-verification model (pair or ArcFace objective) on ImageFolder data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="JSON file of TrainConfig fields; flags override it")
    p.add_argument("--events_file", metavar="FILE", help="append machine-readable JSON-lines events here")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(p)
    return p


def watch_runner(got_signal: list[int], stop: threading.Event, period_s: float = 0.5) -> None:
    """Under the service's job runner (FACEID_RUNNER_PID, the runner's process, is this process's
    parent): stop as SIGTERM stops the run (after this step, saving last.pt) once that process is
    gone. A `faceid worker` that was killed leaves no trainer behind, writing into a job that
    another worker may resume."""
    try:
        runner = int(os.environ.get("FACEID_RUNNER_PID") or 0)
    except ValueError:
        return
    if not runner or os.getppid() != runner:
        return

    def watch() -> None:
        while not stop.wait(period_s):
            if os.getppid() != runner:
                log.warning("the job runner (pid %d) is gone: stopping after this step and saving last.pt", runner)
                got_signal.append(signal.SIGTERM)
                stop.set()

    threading.Thread(target=watch, name="faceid-runner-watch", daemon=True).start()


def train_main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    training_defaults()  # torch is not imported yet (faceid/omp.py)
    args = build_train_parser().parse_args(argv)
    setup_logging()
    events = None
    try:
        cfg = config_from_args(args, args.config)
        if cfg.world_size > 1 and "LOCAL_RANK" not in os.environ:
            return _launch_torchrun(cfg, argv)
        from faceid.data import NoSamePersonPairError
        from faceid.errors import DataError
        from faceid.trainer import run  # torch is imported only once the arguments are valid

        events = EventWriter(args.events_file if int(os.environ.get("RANK", "0")) == 0 else None, quiet=args.quiet)
        check_weight_files(cfg)
        stop = threading.Event()
        got_signal: list[int] = []

        def on_signal(signum, _frame):
            got_signal.append(signum)
            stop.set()
            log.warning("signal %d: stopping after this step and saving last.pt", signum)

        # Restored afterwards, so that an in-process caller (a test, a notebook) keeps its own.
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        watch_runner(got_signal, stop)
        try:
            run(cfg, on_event=events, stop=stop)
        except NoSamePersonPairError:
            # Only pair mode samples pairs from --train (--val is checked for pairs when scanned).
            raise DataError(
                f"--train folder {cfg.train} has no identity with 2 or more readable images, so "
                "--train_mode pair cannot draw a same-person pair; add a second image for some "
                "people, or use --train_mode arcface"
            ) from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if got_signal:
            events(Failed(kind="cancelled", error=f"stopped by signal {got_signal[0]}; resume from last.pt"))
            return EXIT_TERMINATED
        return 0
    except UserError as e:
        return user_error(str(e), events, "config")
    except Exception as e:  # domain errors are user errors; anything else is a bug
        from faceid.errors import ConfigError, DataError, FaceIDError

        if isinstance(e, FaceIDError):
            kind = "data" if isinstance(e, DataError) else "config" if isinstance(e, ConfigError) else "checkpoint"
            return user_error(str(e), events, kind)
        if events:
            events(Failed(kind="internal", error=f"{type(e).__name__}: {e}"))
        raise
    finally:
        if events:
            events.close()
