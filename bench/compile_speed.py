#!/usr/bin/env python
"""Does torch.compile pay on this machine? Eager against torch.compile for FaceID's network, side by
side in one run: a training step (ResNet-50 embedding net + ArcFace head, AdamW, the trainer's
autocast choice and channels_last) and inference (the Verifier's eval-mode forward at batch 1 and
at the serving batch). Prints images/s, the ratio compiled / eager, and what compiling cost.

    .venv/bin/python bench/compile_speed.py                    # 64 px: about 6 min here, most of it compiling
    .venv/bin/python bench/compile_speed.py --img_size 112 --mode max-autotune-no-cudagraphs

Synthetic tensors (speed does not depend on pixel values); --device cuda works where there is one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in faceid's trainer and server

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from faceid.evaluate import autocast_ctx
from faceid.model import ArcMarginProduct, build_model
from faceid.runtime import resolve_amp, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_warm: int, n: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next `n` calls after `n_warm - 1` more)."""
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    for _ in range(n_warm - 1):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def train_row(compiled: bool, args, device, amp) -> dict:
    torch.manual_seed(0)
    net = build_model(embedding_size=512).to(device).to(memory_format=torch.channels_last)
    head = ArcMarginProduct(512, args.classes, s=32.0, m=0.3).to(device)
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-3)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)

    def forward_loss(x, y):
        with autocast_ctx(device, amp):
            return F.cross_entropy(head(net(x).float(), y), y)

    fwd = torch.compile(forward_loss, mode=args.mode) if compiled else forward_loss

    def step():
        loss = fwd(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first, med = timed(step, 3, args.steps, device)
    return {
        "row": f"train step, batch {args.batch}",
        "compiled": "compile" if compiled else "eager",
        "first_s": first,
        "images_per_s": args.batch / med,
    }


def infer_rows(compiled: str, args, device, amp) -> list[dict]:
    """compiled: "" (eager), "compile", or "freeze" (compile with inductor's freezing: weights become
    constants, so batch norm folds into the convolutions and weights are pre-packed)."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    torch._dynamo.reset()
    inductor_config.freezing = compiled == "freeze"
    net = build_model(embedding_size=512).to(device).eval().to(memory_format=torch.channels_last)
    fwd = torch.compile(net, mode=args.mode, dynamic=False) if compiled else net
    rows = []
    for b in (1, args.serve_batch):
        x = torch.randn(b, 3, args.img_size, args.img_size, device=device).to(memory_format=torch.channels_last)

        def run(x=x):
            with torch.inference_mode(), autocast_ctx(device, amp):
                fwd(x)

        first, med = timed(run, 3, max(args.steps, 10), device)
        rows.append(
            {
                "row": f"inference, batch {b}",
                "compiled": compiled or "eager",
                "first_s": first,
                "images_per_s": b / med,
                "ms": 1000 * med,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="training batch (the cpu-small preset's)")
    p.add_argument("--serve_batch", type=int, default=16, help="FACEID_BATCH_MAX_SIZE")
    p.add_argument("--classes", type=int, default=1500)
    p.add_argument("--steps", type=int, default=5, help="measured steps per row (median)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--only", choices=["train", "infer"], help="measure only one half")
    args = p.parse_args()
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    print(
        f"torch {torch.__version__}, device {device}, autocast {amp}, threads {torch.get_num_threads()}, "
        f"{args.img_size} px, compile mode {args.mode}",
        flush=True,
    )
    rows = []
    if args.only != "infer":
        for compiled in (False, True):
            rows.append(train_row(compiled, args, device, amp))
            print(rows[-1], flush=True)
    if args.only != "train":
        for compiled in ("", "compile", "freeze"):
            rows += infer_rows(compiled, args, device, amp)
            print(rows[-2:], flush=True)
    print()
    print("| what | how | images/s | vs eager | first call s (compiling included) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        e = next(x for x in rows if x["row"] == r["row"] and x["compiled"] == "eager")
        print(
            f"| {r['row']} | {r['compiled']} | {r['images_per_s']:.1f} | "
            f"{r['images_per_s'] / e['images_per_s']:.2f}x | {r['first_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
