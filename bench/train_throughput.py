#!/usr/bin/env python
"""Training throughput of the FaceID trainer against a plain fp32 eager loop, on the same JPEGs.

One run, side by side (see bench/README.md for what each row means):

  data only   plain:  torchvision ImageFolder + Resize/ToTensor/Normalize + DataLoader(workers)
              faceid: faceid.data cache (decoded once) + BatchTransform (augment, channels_last)
  decode      faceid: one-time decode + cache cost of faceid.imagestore.load_images
  train       plain:  ResNet-50 (faceid.model.build_model) + ArcMarginProduct, SGD, fp32, NCHW,
                      decoding every step, default torch threads (the origin's CPU path)
              faceid: faceid.train.Trainer itself (max_steps_per_epoch, progress events), with
                      --amp auto / off / bf16, with --compile_step (its compilation falls in
                      the warm-up steps), and under torchrun with 2 gloo processes (DDP)
  matmul      fp32 and bf16 GFLOP/s of an N^3 matmul; share of it the faceid trainer reaches

With --device cuda every row runs on the GPU (the data rows include the copy to it, the plain loop
moves each batch there, the matmul shares are of the GPU's own rate; the DDP row needs a GPU per
process); the 1-thread rows are CPU-only and skipped there. bench/gpu_check.sh runs this and
bench/serve_throughput.py on a GPU machine in one go.

Training rates are steady-state: images of the measured steps over the wall time between the end
of the last warm-up step and the end of the last measured step. For the trainer the step end
times come from its own `progress` events (one per step here), so the number is the real code's.

    .venv/bin/python bench/train_throughput.py                  # data/sample/train, ~6 min
    .venv/bin/python bench/train_throughput.py --data lfw       # $FACEID_LFW_DIR (all of LFW)
    python bench/train_throughput.py --device cuda --data DIR --batch_size 128 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
RESNET50_GFLOP_224 = 4.1  # forward, per image, at 224 px
ROWS = ("matmul", "data", "plain", "plain_t1", "faceid", "off", "bf16", "t1", "compile", "ddp")


# --- machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# --- helpers --------------------------------------------------------------------------------


def resolve_data(arg: Optional[str]) -> Path:
    """--data: a folder, or 'lfw' for $FACEID_LFW_DIR."""
    if arg in (None, ""):
        arg = str(REPO / "data" / "sample" / "train")
    if arg == "lfw":
        arg = os.environ.get("FACEID_LFW_DIR")
        if not arg:
            sys.exit("error: --data lfw reads FACEID_LFW_DIR; set it to the LFW folder")
    p = Path(arg)
    if not p.is_absolute() and not p.exists():
        p = REPO / p
    if not p.is_dir():
        sys.exit(f"error: --data {p} is not a folder (give an ImageFolder root, or 'lfw' with FACEID_LFW_DIR set)")
    return p


def steady_rate(marks: list[tuple[int, float]], warmup: int, images_per_step: int) -> tuple[float, int]:
    """marks: (step, end time) with step 0 = start. Rate over the steps after `warmup`."""
    a = next((m for m in marks if m[0] >= warmup), None)
    b = marks[-1]
    if a is None or b[0] <= a[0]:
        return float("nan"), 0
    n = b[0] - a[0]
    return n * images_per_step / (b[1] - a[1]), n


def tiny_val(src, dst: Path) -> Path:
    """A 4-image validation folder (2 identities x 2 images, symlinks) so that the trainer's
    end-of-epoch evaluation costs next to nothing; it runs after the measured steps anyway."""
    labels = src.labels
    ids = [c for c in range(src.num_identities) if (labels == c).sum() >= 2][:2]
    for c in ids:
        d = dst / src.names[c]
        d.mkdir(parents=True, exist_ok=True)
        for p in [src.paths[i] for i in (labels == c).nonzero()[0][:2]]:
            (d / p.name).symlink_to(p.resolve())
    return dst


def gflop_per_train_image(img_size: int) -> float:
    return 3 * RESNET50_GFLOP_224 * (img_size / 224) ** 2


# --- matmul ---------------------------------------------------------------------------------


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU has nothing queued)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype, n: int, device, min_s: float = 1.5) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.mm(a, b)  # warm-up (oneDNN kernel creation, cuBLAS handle)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=c)
        reps += 1
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_s and reps >= 2:
            return 2 * n**3 * reps / dt / 1e9


# --- data only ------------------------------------------------------------------------------


def plain_loader(data: Path, img_size: int, batch_size: int, workers: int, seed: int, pin: bool = False):
    import torch
    from torchvision import datasets, transforms

    from faceid.model import IMAGENET_MEAN, IMAGENET_STD

    tf = transforms.Compose(
        [
            transforms.Resize((img_size, img_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = datasets.ImageFolder(str(data), transform=tf, allow_empty=True)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, generator=g, pin_memory=pin
    )
    return ds, loader


def endless(loader):
    while True:
        yield from loader


def bench_plain_data(args, data: Path, n_batches: int, device) -> dict[str, Any]:
    """Images/s of the plain DataLoader alone (and the copy to a GPU): first batch (worker start)
    excluded."""
    cuda = device.type == "cuda"
    _, loader = plain_loader(data, args.img_size, args.batch_size, args.workers, args.seed, pin=cuda)
    it = endless(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        x, _ = next(it)
        if cuda:
            x.to(device, non_blocking=True)
    sync(device)
    dt = time.perf_counter() - t0
    del it
    return {"images_per_s": n_batches * args.batch_size / dt, "batches": n_batches}


def bench_faceid_data(args, data: Path, n_batches: int, device) -> dict[str, Any]:
    """faceid: one-time decode + cache (load_images), then the per-step data path of the trainer
    (batch_images from the store + BatchTransform with augmentation and channels_last)."""
    import numpy as np
    import torch

    from faceid.config import TrainConfig
    from faceid.data import BatchTransform, classification_batches, scan_folder
    from faceid.imagestore import batch_images, load_images
    from faceid.runtime import set_threads

    folder = scan_folder(data, what="--train")
    t0 = time.perf_counter()
    folder, store = load_images(folder, args.img_size, workers=args.workers, what="--train")
    decode_s = time.perf_counter() - t0
    cfg = TrainConfig(threads=args.threads, workers=args.workers)
    threads = set_threads(cfg, device, cached=store.cached is not None)
    tf = BatchTransform(device, augment=True, channels_last=True)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    batches: list = []
    while len(batches) < n_batches + 1:
        batches += classification_batches(folder.labels, args.batch_size, rng, balanced=False)
    it = batch_images(store, batches[: n_batches + 1], workers=args.workers)
    tf(next(it), gen)
    t0 = time.perf_counter()
    for raw in it:
        x = tf(raw, gen)
    sync(device)
    dt = time.perf_counter() - t0
    assert x.shape[1:] == (3, args.img_size, args.img_size)
    return {
        "images_per_s": n_batches * args.batch_size / dt,
        "batches": n_batches,
        "decode_s": decode_s,
        "decode_images": len(folder),
        "decode_images_per_s": len(folder) / decode_s,
        "cached": store.cached is not None,
        "threads": threads,
        "folder": folder,
    }


# --- training -------------------------------------------------------------------------------


def bench_plain_train(args, data: Path, threads: int, device) -> dict[str, Any]:
    """The origin's path: decode every step in DataLoader workers, fp32, NCHW, eager (each batch
    copied to the GPU with --device cuda)."""
    import torch
    import torch.nn.functional as F

    from faceid.model import ArcMarginProduct, build_model

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    ds, loader = plain_loader(data, args.img_size, args.batch_size, args.workers, args.seed, pin=device.type == "cuda")
    model = build_model(embedding_size=512).to(device)
    head = ArcMarginProduct(512, len(ds.classes), s=64.0, m=0.5).to(device)
    opt = torch.optim.SGD(
        list(model.parameters()) + list(head.parameters()), lr=args.lr, momentum=0.9, weight_decay=5e-4
    )
    model.train()
    head.train()
    it = endless(loader)
    marks = [(0, time.perf_counter())]
    losses = []
    for step in range(1, args.warmup + args.steps + 1):
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(head(model(x), y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # waits for the step on a GPU too
        marks.append((step, time.perf_counter()))
    del it
    rate, n = steady_rate(marks, args.warmup, args.batch_size)
    return {
        "images_per_s": rate,
        "steps": n,
        "threads": torch.get_num_threads(),
        "step_s": [round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:])],
        "loss": losses[-1],
    }


def trainer_config(args, data: Path, val: Path, ckpt: Path, amp: str, steps: int, threads: int):
    from faceid.config import TrainConfig

    return TrainConfig(
        train=str(data),
        val=str(val),
        ckpt_dir=str(ckpt),
        train_mode="arcface",
        img_size=args.img_size,
        batch_size=args.batch_size,
        epochs=1,
        max_steps_per_epoch=steps,
        amp=amp,
        threads=threads,
        workers=args.workers,
        optimizer="sgd",
        lr=args.lr,
        arcface_s=64.0,
        arcface_m=0.5,
        eval_pairs=64,
        progress_step_pct=1.0,
        seed=args.seed,
        device=args.device,
    )


def rate_from_events(events: list[dict], warmup: int, images_per_step: int) -> dict[str, Any]:
    start = next(e for e in events if e["event"] == "start")
    prog = [e for e in events if e["event"] == "progress"]
    if not prog:
        raise RuntimeError("the trainer emitted no progress events")
    marks = [(0, start["time"])] + [(e["step"], e["time"]) for e in prog]
    rate, n = steady_rate(marks, warmup, images_per_step)
    return {
        "images_per_s": rate,
        "steps": n,
        "reported_images_per_s": prog[-1]["images_per_s"],
        "amp": start["amp"],
        "world_size": start["world_size"],
        "step_s": [round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:])],
        "loss": prog[-1]["loss"],
        "start_time": start["time"],
    }


def bench_trainer(
    args,
    data: Path,
    val: Path,
    tmp: Path,
    amp: str,
    steps: int,
    default_threads: int,
    threads: Optional[int] = None,
    compile_step: bool = False,
) -> dict[str, Any]:
    """faceid.train.run in this process; rate from its progress events."""
    import torch

    from faceid.train import run

    torch.set_num_threads(default_threads)  # set_threads inside the trainer decides
    ckpt = tmp / f"ckpt_{amp}"
    cfg = trainer_config(args, data, val, ckpt, amp, steps, args.threads if threads is None else threads)
    cfg = cfg.model_copy(update={"compile_step": compile_step})
    events: list[dict] = []
    t0 = time.time()
    run(cfg, on_event=events.append)
    out = rate_from_events(events, args.warmup, args.batch_size)
    out["setup_s"] = out.pop("start_time") - t0
    out["threads"] = torch.get_num_threads()
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def bench_ddp(args, data: Path, val: Path, tmp: Path, steps: int, nproc: int) -> dict[str, Any]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m faceid.train ...`"""
    ckpt = tmp / "ckpt_ddp"
    ev = tmp / "ddp_events.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "faceid.train",
        "--train",
        str(data),
        "--val",
        str(val),
        "--ckpt_dir",
        str(ckpt),
        "--train_mode",
        "arcface",
        "--img_size",
        str(args.img_size),
        "--batch_size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        str(steps),
        "--amp",
        "auto",
        "--threads",
        str(args.threads),
        "--workers",
        str(args.workers),
        "--optimizer",
        "sgd",
        "--lr",
        str(args.lr),
        "--eval_pairs",
        "64",
        "--progress_step_pct",
        "1",
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--events_file",
        str(ev),
        "--quiet",
    ]
    env = dict(os.environ, FACEID_LOG_LEVEL="WARNING")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ddp_timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {args.ddp_timeout} s") from None
    events = [json.loads(line) for line in ev.read_text().splitlines()] if ev.exists() else []
    failed = [e for e in events if e["event"] == "failed"]
    if p.returncode != 0 or failed or not events:
        lines = [ln for ln in (p.stderr or "").splitlines() if ln.strip()]
        err = failed[0]["error"] if failed else (lines[-1] if lines else f"exit code {p.returncode}")
        raise RuntimeError(f"torchrun exit {p.returncode}: {err}")
    # images per step across all ranks: each rank takes batch_size
    out = rate_from_events(events, args.warmup, args.batch_size * nproc)
    out["setup_s"] = out.pop("start_time") - t0
    out["threads"] = f"{max(1, (args.threads or os.cpu_count() or 1) // nproc)}/rank"
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


# --- main -----------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data", default="data/sample/train", help="ImageFolder root of real JPEGs, or 'lfw' for $FACEID_LFW_DIR"
    )
    p.add_argument("--img_size", type=int, default=112)
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per row")
    p.add_argument("--warmup", type=int, default=1, help="training steps run before measuring")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="faceid compute threads (0: faceid.runtime.set_threads decides); the plain loop keeps torch's default",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (plain loop; faceid decode)")
    p.add_argument("--data_batches", type=int, default=8, help="batches timed in the data-only rows")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where every row runs (auto: cuda when available)",
    )
    p.add_argument("--matmul_n", type=int, default=0, help="matrix side (0: 2048 on a CPU, 8192 on a GPU)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--ddp_nproc", type=int, default=2)
    p.add_argument("--ddp_timeout", type=int, default=420)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="measure --amp off/bf16 even when auto resolves to the same dtype (default: reuse the auto row)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    args = p.parse_args(argv)
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = rows - set(ROWS)
    if unknown:
        p.error(f"unknown --rows {sorted(unknown)}; choose from {', '.join(ROWS)}")

    data = resolve_data(args.data)
    os.chdir(REPO)

    import torch

    from faceid.errors import ConfigError
    from faceid.runtime import cpu_has_native_bf16, resolve_amp, resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as e:
        p.error(str(e))
    args.device = device.type
    cuda = device.type == "cuda"
    if not args.matmul_n:
        args.matmul_n = 8192 if cuda else 2048
    default_threads = torch.get_num_threads()
    t_all = time.time()
    flags = cpu_flags()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "native_bf16": cpu_has_native_bf16(),
        "avx512f": "avx512f" in flags,
        "loadavg_start": loadavg(),
        "data": str(data),
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "default_threads": default_threads,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    auto_dtype = resolve_amp("auto", device)
    auto_name = str(auto_dtype).replace("torch.", "") if auto_dtype else "fp32"
    print(
        f"# {info['date']}  {info['cpu']}  {info['cores']} cores  torch {info['torch']}  "
        f"native bf16: {info['native_bf16']}  load avg: {info['loadavg_start']}",
        flush=True,
    )
    if cuda:
        print(f"# device cuda: {info['gpu']}", flush=True)
    print(
        f"# data {data}  img {args.img_size}  batch {args.batch_size}  warmup {args.warmup} + "
        f"{args.steps} steps  workers {args.workers}  amp auto -> {auto_name}",
        flush=True,
    )

    res: dict[str, Any] = {}

    def attempt(key: str, fn, *a, **kw) -> None:
        t = time.time()
        print(f"... {key}", end="", flush=True)
        try:
            res[key] = fn(*a, **kw)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            res[key] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]}
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
        r = res[key]
        r.setdefault("load", loadavg().split()[0])
        shown = r.get("images_per_s", r.get("gflops", r.get("error", "")))
        unit = " img/s" if "images_per_s" in r else " GFLOP/s" if "gflops" in r else ""
        print(
            f" {shown if isinstance(shown, str) else round(shown, 2)}{unit}  ({time.time() - t:.0f} s, "
            f"load {loadavg()})",
            flush=True,
        )
        gc.collect()

    from faceid.data import scan_folder

    folder = scan_folder(data, what="--data")
    n_batches = len(folder) // args.batch_size
    steps = args.warmup + args.steps
    if steps > n_batches:
        sys.exit(
            f"error: {steps} steps of {args.batch_size} need {steps * args.batch_size} images; "
            f"{data} has {len(folder)}; lower --steps/--warmup/--batch_size or use --data lfw"
        )
    if args.warmup < 1:
        print("# warning: --warmup 0 measures the first step (kernel creation, worker start)")

    with tempfile.TemporaryDirectory(prefix="faceid-bench-") as tmpd:
        tmp = Path(tmpd)
        val = tiny_val(folder, tmp / "val")
        if "matmul" in rows:
            torch.set_num_threads(default_threads)
            attempt("matmul_fp32", lambda: {"gflops": matmul_gflops(torch.float32, args.matmul_n, device)})
            attempt("matmul_bf16", lambda: {"gflops": matmul_gflops(torch.bfloat16, args.matmul_n, device)})
        if "data" in rows:
            nb = min(args.data_batches, max(1, n_batches - 1))
            attempt("data_plain", bench_plain_data, args, data, nb, device)
            attempt("data_faceid", bench_faceid_data, args, data, nb, device)
            res.get("data_faceid", {}).pop("folder", None)
        if "plain" in rows:
            attempt("train_plain", bench_plain_train, args, data, default_threads, device)
        if "plain_t1" in rows and default_threads != 1 and not cuda:
            attempt("train_plain_t1", bench_plain_train, args, data, 1, device)
        if "faceid" in rows:
            attempt("train_faceid_auto", bench_trainer, args, data, val, tmp, "auto", steps, default_threads)
        for mode, row in (("off", "off"), ("bf16", "bf16")):
            if row not in rows:
                continue
            dtype = resolve_amp(mode, device)
            if dtype == auto_dtype and "train_faceid_auto" in res and not args.remeasure:
                res[f"train_faceid_{mode}"] = {
                    **res["train_faceid_auto"],
                    "same_as": f"same measurement as amp=auto (auto resolves to {auto_name} here)",
                }
                continue
            attempt(f"train_faceid_{mode}", bench_trainer, args, data, val, tmp, mode, steps, default_threads)
        if "t1" in rows and not cuda:
            picked = res.get("train_faceid_auto", {}).get("threads")
            if picked == 1:
                res["train_faceid_t1"] = {
                    **res["train_faceid_auto"],
                    "same_as": "same measurement as amp=auto (it used 1 thread)",
                }
            else:
                attempt(
                    "train_faceid_t1", bench_trainer, args, data, val, tmp, "auto", steps, default_threads, threads=1
                )
        if "compile" in rows:
            attempt(
                "train_faceid_compile", bench_trainer, args, data, val, tmp, "auto", steps, default_threads, None, True
            )
        if "ddp" in rows:
            ddp_steps = min(steps, n_batches // args.ddp_nproc)
            if cuda and torch.cuda.device_count() < args.ddp_nproc:
                res["train_ddp"] = {
                    "error": f"{args.ddp_nproc} processes need {args.ddp_nproc} GPUs (NCCL: one "
                    f"per process); this machine has {torch.cuda.device_count()}"
                }
            elif ddp_steps <= args.warmup:
                res["train_ddp"] = {
                    "error": f"{len(folder)} images give {n_batches // args.ddp_nproc} "
                    f"steps per rank; need more than --warmup {args.warmup}"
                }
            else:
                attempt("train_ddp", bench_ddp, args, data, val, tmp, ddp_steps, args.ddp_nproc)
        if "matmul" in rows:  # again at the end: the machine is shared, its load moves
            torch.set_num_threads(default_threads)
            attempt("matmul_fp32_end", lambda: {"gflops": matmul_gflops(torch.float32, args.matmul_n, device)})
            attempt("matmul_bf16_end", lambda: {"gflops": matmul_gflops(torch.bfloat16, args.matmul_n, device)})
        torch.set_num_threads(default_threads)

    info["loadavg_end"] = loadavg()
    info["wall_s"] = round(time.time() - t_all, 1)
    print_table(args, info, res, auto_name)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": res}, indent=2, default=str) + "\n")
    return 0


def print_table(args, info: dict, res: dict, auto_name: str) -> None:
    gf = gflop_per_train_image(args.img_size)

    def mm(dtype: str) -> Optional[float]:
        vals = [res.get(k, {}).get("gflops") for k in (f"matmul_{dtype}", f"matmul_{dtype}_end")]
        vals = [v for v in vals if v]
        return max(vals) if vals else None

    mm32, mm16 = mm("fp32"), mm("bf16")
    best = max([g for g in (mm32, mm16) if g], default=None)
    plain = res.get("train_plain", {}).get("images_per_s")

    lines = [
        "| row | images/s | vs plain loop | GFLOP/s | % of bf16 matmul | % of best matmul | load | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(label: str, key: str, train: bool, note: str = "") -> None:
        r = res.get(key)
        if r is None:
            return
        if "error" in r:
            lines.append(f"| {label} | FAILED | - | - | - | - | {r.get('load', '-')} | {r['error']} |")
            return
        v = r["images_per_s"]
        extra = [note] if note else []
        if r.get("same_as"):
            extra.append(r["same_as"])
        if train:
            if "threads" in r:
                extra.append(f"threads {r['threads']}")
            if "step_s" in r:
                extra.append("step s " + " / ".join(str(t) for t in r["step_s"]))
            if "setup_s" in r:
                extra.append(f"setup {r['setup_s']:.1f} s")
            if "reported_images_per_s" in r:
                extra.append(f"trainer's own img/s {r['reported_images_per_s']}")
            cells = [
                f"{v / plain:.2f}x" if plain else "-",
                f"{v * gf:.1f}",
                f"{100 * v * gf / mm16:.0f}%" if mm16 else "-",
                f"{100 * v * gf / best:.0f}%" if best else "-",
            ]
        else:
            cells = ["-", "-", "-", "-"]
        lines.append(f"| {label} | {v:.1f} | {' | '.join(cells)} | {r.get('load', '-')} | {'; '.join(extra)} |")

    w = args.workers
    d = res.get("data_faceid", {})
    row(
        f"data only: plain ImageFolder + transforms + DataLoader({w} workers)",
        "data_plain",
        False,
        "decode + resize + normalise every image",
    )
    row(
        "data only: faceid cache + BatchTransform (augment, channels_last)",
        "data_faceid",
        False,
        ("per-step path after the one-time decode" if d.get("cached") else "decoded per batch (no cache)")
        + (f"; threads {d['threads']}" if "threads" in d else ""),
    )
    if d and "decode_s" in d:
        lines.append(
            f"| one-time: faceid decode + cache ({d['decode_images']} images, {w} workers) | "
            f"{d['decode_images_per_s']:.1f} | - | - | - | - | {d.get('load', '-')} | "
            f"{d['decode_s']:.1f} s, once per run before step 1 |"
        )
    row("train: plain loop (fp32, NCHW, decode every step, default threads)", "train_plain", True)
    row(
        "train: plain loop, torch threads 1",
        "train_plain_t1",
        True,
        "the same loop with 1 compute thread (not the origin's setting)",
    )
    row(f"train: faceid Trainer, amp auto (-> {auto_name}), channels_last", "train_faceid_auto", True)
    row("train: faceid Trainer, amp off (fp32), channels_last", "train_faceid_off", True)
    row("train: faceid Trainer, amp bf16, channels_last", "train_faceid_bf16", True)
    row(
        "train: faceid Trainer, amp auto, --threads 1",
        "train_faceid_t1",
        True,
        "1 compute thread instead of set_threads' choice",
    )
    row(
        "train: faceid Trainer, amp auto, --compile_step",
        "train_faceid_compile",
        True,
        "torch.compile of the step; its compilation is in the warm-up steps",
    )
    row(
        f"train: faceid under torchrun, {args.ddp_nproc} processes (DDP, gloo), amp auto",
        "train_ddp",
        True,
        f"global batch {args.batch_size * args.ddp_nproc}",
    )

    def mm_text(dtype: str) -> str:
        a = res.get(f"matmul_{dtype}", {}).get("gflops")
        b = res.get(f"matmul_{dtype}_end", {}).get("gflops")
        return f"{dtype} " + " / ".join(f"{x:.0f}" for x in (a, b) if x)

    print()
    if info.get("gpu"):
        print(f"device cuda: {info['gpu']} (every row below ran on it; matmul shares are of its rates)")
    print(
        f"date {info['date']}; cpu {info['cpu']} ({info['cores']} cores, native bf16: "
        f"{info['native_bf16']}); torch {info['torch']}; load average {info['loadavg_start']} at start, "
        f"{info['loadavg_end']} at end; wall {info['wall_s']} s"
    )
    print(
        f"data {info['data']}; img_size {args.img_size}; batch {args.batch_size}; warmup {args.warmup} + "
        f"{args.steps} measured steps; ResNet-50 training step = {gf:.2f} GFLOP/image"
    )
    if best:
        print(
            f"matmul {args.matmul_n}^3 GFLOP/s at start / end: {mm_text('fp32')}; {mm_text('bf16')} "
            f"(shares below use the higher of each)"
        )
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
