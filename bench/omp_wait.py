"""How OpenMP's idle threads should wait: spin, sleep, or the library default.

torch on Linux uses GNU OpenMP (libgomp). Between parallel regions its idle threads spin for a
while (default; GOMP_SPINCOUNT sets how long) or sleep at once (OMP_WAIT_POLICY=PASSIVE).
Spinning wins when a process has the cores to itself; sleeping wins when another process needs a
core, because a spinning thread then holds a core its partner is waiting for; but a sleeping thread
has to be woken at every one of the network's parallel regions. Measured, for each policy, on an
otherwise idle machine and beside one process that keeps a core busy (as a server answering
requests, or a second job, would), in one run, policies interleaved:

  train    training images/s of the cpu-small preset (64 px, batch 64, the trainer's threads)
  serve1   ms per forward pass of one image and its mirror image (as the server embeds), 20 ms
           between calls (a server between requests)
  serve16  the same with 16 images
  serve1_1thread  serve1 with one compute thread (nothing to wake)

    python bench/omp_wait.py                              # about 15 minutes here
    python bench/omp_wait.py --workloads train --rounds 1 # a quick look

Each measurement is a fresh process (the policy is read when OpenMP starts). Training runs
`--steps` steps on the shipped sample (`data/sample/train`), the first step left out; inference
makes 3 x `--steps` calls after 3 warm-up calls, and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from serve_common import loadavg, machine  # noqa: E402

POLICIES = {
    "default": {},  # libgomp: spin about 300,000 rounds, then sleep
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin10k": {"GOMP_SPINCOUNT": "10000"},  # shorter spins
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}


def child(steps: int, data: str) -> None:
    from faceid.config import TrainConfig
    from faceid.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            preset="cpu-small",
            train=f"{data}/train",
            val=f"{data}/val",
            ckpt_dir=tmp,
            epochs=max(1, steps),
            eval_pairs=200,
            progress_step_pct=0.1,
            warmup_epochs=0,
            margin_warmup_epochs=0,
        )
        trainer = Trainer(cfg)
        trainer.setup()
        # Only the steps are timed: the intervals between steps of one epoch. Epoch ends (evaluation,
        # checkpoints) are skipped; a small folder has few steps per epoch, so run as many epochs
        # as it takes.
        trainer._end_epoch = lambda *a, **k: None
        gaps: list[float] = []
        last: dict[str, float] = {}

        def on_event(ev: dict) -> None:
            if ev["event"] != "progress":
                return
            if last.get("epoch") == ev["epoch"]:
                gaps.append(ev["time"] - last["time"])
            last.update(epoch=ev["epoch"], time=ev["time"])
            if len(gaps) > steps:  # the first interval is left out: the run warms up
                trainer.stop.set()

        trainer.emit_fn = on_event
        trainer.fit()
        import torch

        print(
            json.dumps(
                {
                    "images_per_s": cfg.batch_size / statistics.median(gaps[1:]),
                    "steps": len(gaps) - 1,
                    "threads": torch.get_num_threads(),
                }
            )
        )


def child_infer(batch: int, calls: int, gap_ms: float, threads: int = 0) -> None:
    """Median ms of one eval-mode forward pass of FaceID's network at 64 px over `batch` images and
    their mirror images (as the server embeds), `gap_ms` of idling between calls (a server between
    requests)."""
    import torch

    from faceid.model import build_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_model().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 64, 64)
    x = torch.cat([x, x.flip(3)]).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(calls + 3):  # 3 warm-up calls
            time.sleep(gap_ms / 1000)
            t = time.perf_counter()
            net(x)
            if i >= 3:
                times.append(time.perf_counter() - t)
    print(json.dumps({"ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}))


WORKLOADS = {
    # name: (child arguments, unit, higher is better)
    "train": (["--child", "train"], "training images/s", True),
    "serve1": (["--child", "infer", "--batch", "1", "--gap_ms", "20"], "ms per 1-image forward, 20 ms apart", False),
    "serve16": (["--child", "infer", "--batch", "16", "--gap_ms", "20"], "ms per 16-image forward, 20 ms apart", False),
    "serve1_1thread": (
        ["--child", "infer", "--batch", "1", "--gap_ms", "20", "--threads", "1"],
        "ms per 1-image forward, 20 ms apart, 1 compute thread",
        False,
    ),
}


def measure(workload: str, policy: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, __file__, *WORKLOADS[workload][0], "--steps", str(args.steps), "--data", args.data]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return {"value": res.get("images_per_s", res.get("ms")), "threads": res["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="train,serve1,serve16", help=f"any of {','.join(WORKLOADS)}")
    ap.add_argument("--steps", type=int, default=8, help="training steps, or forward calls, per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--data", default=str(REPO / "data" / "sample"))
    ap.add_argument("--child", choices=["train", "infer"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--gap_ms", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "train":
        child(args.steps, args.data)
        return
    if args.child == "infer":
        child_infer(args.batch, max(5, args.steps * 3), args.gap_ms, args.threads)
        return
    policies = args.policies.split(",")
    workloads = args.workloads.split(",")
    print(f"machine: {machine()}; load average {loadavg()}", flush=True)
    results: dict[tuple[str, str, str], list[float]] = {}
    conditions = ("idle", "one busy core")
    for condition in conditions:
        hog = None
        if condition != "idle":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            for w in workloads:
                for r in range(args.rounds):
                    for p in policies if r % 2 == 0 else policies[::-1]:
                        m = measure(w, p, args)
                        results.setdefault((w, condition, p), []).append(m["value"])
                        print(f"{w:>8} {condition:>14} {p:>8}: {m['value']:7.1f} ({m['threads']} threads)", flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print(f"\nload average after: {loadavg()}\n")
    print("| workload | machine | OMP wait | median | runs | vs default |")
    print("|---|---|---|---:|---|---:|")
    for w in workloads:
        unit, higher = WORKLOADS[w][1], WORKLOADS[w][2]
        for condition in conditions:
            ref = statistics.median(results[(w, condition, policies[0])])
            for p in policies:
                v = results[(w, condition, p)]
                med = statistics.median(v)
                speed = med / ref if higher else ref / med
                print(
                    f"| {w} ({unit}) | {condition} | {p} | {med:.1f} | {' / '.join(f'{x:.1f}' for x in v)} | "
                    f"{speed:.2f}x faster |"
                )


if __name__ == "__main__":
    main()
