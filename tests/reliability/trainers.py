"""Training commands that misbehave on purpose, for the fault tests (FACEID_TRAINER_CMD /
Settings.trainer_cmd). The runner appends `--config FILE --events_file FILE`.

    python trainers.py corrupt_best ARGS...      the fake trainer, then backbone_best.pt overwritten
    python trainers.py garbage_events ARGS...    junk lines in events.jsonl, then the fake trainer
    python trainers.py dump_env ARGS...          the environment to <ckpt_dir>/env.json, then the fake trainer
    python trainers.py enospc_at:N ARGS...       the real `python -m faceid.train`; its N-th torch.save
                                                 writes a few bytes and fails with ENOSPC (disk full)

The fault is injected only into a first attempt: a resumed run (config `resume` set) is clean.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "app"))


def _config(args: list[str]) -> dict:
    return json.loads(Path(args[args.index("--config") + 1]).read_text())


def _fake(args: list[str]) -> int:
    import fake_trainer

    sys.argv = ["fake_trainer.py", *args]
    return fake_trainer.main()


def _inject_save_fault(at: int) -> None:
    import torch

    real_save = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == at:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    torch.save = save


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    cfg = _config(args)
    ckpt_dir = Path(cfg["ckpt_dir"])
    if mode == "corrupt_best":
        rc = _fake(args)
        (ckpt_dir / "backbone_best.pt").write_bytes(b"\x00 not a checkpoint")
        return rc
    if mode == "garbage_events":
        events = Path(args[args.index("--events_file") + 1])
        with open(events, "ab") as f:
            f.write(b"not json\n\xff\xfe\x00binary\n[1, 2]\n" + b"{" * (2 << 20) + b"\n")
            for ev in (
                {"event": "progress", "epoch": "x", "percent": None, "loss": "NaN"},
                {"event": "checkpoint", "kind": "best", "path": 123},
                {"event": "epoch", "epoch": None, "best_epoch": [1]},
                {"event": "failed", "error": {"nested": True}, "kind": 5},
                {"event": "start", "device": 7, "epochs": "many"},
            ):
                f.write(json.dumps(ev).encode() + b"\n")
        return _fake(args)
    if mode == "dump_env":
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "env.json").write_text(json.dumps(dict(os.environ)))
        return _fake(args)
    kind, _, at = mode.partition(":")
    if kind == "enospc_at":
        if not cfg.get("resume"):
            _inject_save_fault(int(at))
        from faceid.cli import train_main

        return train_main(args)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
