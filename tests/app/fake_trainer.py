"""A stand-in for `python -m faceid.train` that speaks the events contract (docs/CONTRACTS.md 1)
in milliseconds, so the job runner's tests need no torch.

    python fake_trainer.py [--step_s S] --config CONFIG.json --events_file EVENTS.jsonl

The job's `seed` picks the behaviour (see MODES). Checkpoints are JSON files that the tests' fake
verifier loader reads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OK, DATA_ERROR, CRASH, KILLED, SLOW, STUBBORN, NO_CHECKPOINT, DIE_AFTER_EPOCH = 42, 1, 2, 3, 4, 5, 6, 7
MODES = {
    OK: "ok",
    DATA_ERROR: "data_error",
    CRASH: "crash",
    KILLED: "killed",
    SLOW: "slow",
    STUBBORN: "stubborn",
    NO_CHECKPOINT: "no_checkpoint",
    DIE_AFTER_EPOCH: "die_after_epoch",
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--events_file", required=True)
    p.add_argument("--step_s", type=float, default=0.01)
    args = p.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    mode = MODES.get(cfg["seed"], "ok")
    ckpt_dir = Path(cfg["ckpt_dir"])
    events = open(args.events_file, "a", buffering=1)
    stop = []

    def emit(event: str, **fields) -> None:
        events.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        events.flush()

    def save(name: str, epoch: int, **extra) -> Path:
        path = ckpt_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "format": "fake",
                    "epoch": epoch,
                    "embedding_size": 12,
                    "img_size": cfg["img_size"],
                    "thresholds": {"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9},
                    "metrics": {"acc": 0.6 + 0.01 * epoch},
                    "init_from": cfg.get("init_from"),
                    **extra,
                }
            )
        )
        os.replace(tmp, path)
        return path

    if mode != "stubborn":
        signal.signal(signal.SIGTERM, lambda *_: stop.append(signal.SIGTERM))
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake trainer: mode {mode}, pid {os.getpid()}", flush=True)
    if mode in ("slow", "stubborn"):
        # A grandchild in the same process group, like a DataLoader worker.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (ckpt_dir / "child.pid").write_text(str(child.pid))

    if mode == "data_error":
        msg = "--train /nowhere has no identity folders; give an ImageFolder root"
        emit("failed", error=msg, kind="data")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if cfg.get("init_from") and not Path(cfg["init_from"]).is_file():
        msg = f"init_from model not found: {cfg['init_from']}"
        emit("failed", error=msg, kind="config")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: fake internal failure", file=sys.stderr)
        return 1

    epochs = cfg["epochs"]
    # slow / stubborn run until stopped; resumed, they finish (the test of resume needs an end).
    steps = 100_000 if mode in ("slow", "stubborn") and not cfg.get("resume") else 4
    start_epoch = 1
    if cfg.get("resume"):
        start_epoch = json.loads(Path(cfg["resume"]).read_text())["epoch"] + 1
        print(f"resuming from {cfg['resume']} at epoch {start_epoch}", flush=True)
    emit("start", epochs=epochs, steps_per_epoch=steps, device="cpu", amp="off", world_size=1, config=cfg)
    best_value = -1.0
    for epoch in range(start_epoch, epochs + 1):
        for step in range(1, steps + 1):
            time.sleep(args.step_s)
            loss = float("nan") if step == 1 and epoch == 1 else 1.0 / (epoch * steps + step)
            emit(
                "progress",
                epoch=epoch,
                epochs=epochs,
                step=step,
                steps=steps,
                percent=round(100.0 * ((epoch - 1) * steps + step) / (epochs * steps), 2),
                loss=loss,
                images_per_s=100.0,
                lr=0.001,
                eta_s=1.0,
            )
            if mode == "killed" and epoch == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                break
        acc = 0.6 + 0.01 * epoch
        is_best = acc > best_value
        if is_best:
            best_value = acc
            # the best epoch's ROC (a curve whose area grows with the epoch), as the trainer writes it
            roc = {
                "epoch": epoch,
                "far": [0.0, 0.001, 0.01, 0.1, 1.0],
                "tar": [0.0, 0.1 * epoch, 0.2 * epoch, 0.4, 1.0],
                "threshold": [1.0, 0.9, 0.8, 0.5, -1.0],
                "n_pos": 100,
                "n_neg": 1000,
                "thresholds": {"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9},
            }
            (ckpt_dir / "roc.json").write_text(json.dumps(roc))
            if mode != "no_checkpoint":
                path = save("backbone_best.pt", epoch)
                emit("checkpoint", kind="best", path=str(path), epoch=epoch)
        emit(
            "epoch",
            epoch=epoch,
            global_step=(epoch - 1) * steps + step,
            train_loss=0.5,
            lr=0.001,
            acc=acc,
            th=0.5,
            auc=0.7,
            **{"tar_1e-2": 0.1, "tar_1e-3": 0.01, "th_far_1e-2": 0.8, "th_far_1e-3": 0.9},
            is_best=is_best,
            best_epoch=epoch,
            best_value=best_value,
            epoch_time_s=0.1,
        )
        path = save("last.pt", epoch)
        emit("checkpoint", kind="last", path=str(path), epoch=epoch)
        if stop:
            emit("failed", error="stopped by signal 15; resume from last.pt", kind="cancelled")
            return 143
        if mode == "die_after_epoch":
            os.kill(os.getpid(), signal.SIGKILL)
    best = ckpt_dir / "backbone_best.pt"
    emit(
        "finished",
        best_epoch=epochs,
        best_metric=cfg["best_metric"],
        best_value=best_value,
        best_checkpoint=str(best) if best.exists() else None,
        thresholds={"acc": 0.5, "far_1e-2": 0.8, "far_1e-3": 0.9},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
