"""What finding and aligning faces costs the server: the same quick preset model served aligned and
unaligned, measured side by side.

Two checkpoints are trained here for a few steps with the cpu-small preset (56 px, mirror views),
one with `align` arcface and one with `align` none, and served by two server processes started
together. In alternating blocks, so both see the same machine:
  lone /verify   one client, back-to-back /verify of two sample photos (154 px face crops), of
                 two whole-scene photos (faceid.scenes, 720x540), and of the same scenes enlarged
                 to a 12 MP phone photo's 4032x3024: median latency
  16 clients     16 concurrent clients posting /embed of a sample photo: images/s
and the table gives each with the aligned/unaligned ratio. A second table splits the lone requests'
time into the parts of their Server-Timing header (decoding, finding the faces, forward pass).

    python bench/align_cost.py                       # about 5 minutes on 2 cores
    python bench/align_cost.py --blocks 2 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import REPO, SAMPLE, RawClient, Server, machine, pythonpath, sample_images

from faceid.scenes import make_scene


def train(align: str, out: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "faceid.train",
        "--preset",
        "cpu-small",
        "--align",
        align,
        "--train",
        str(SAMPLE / "train"),
        "--val",
        str(SAMPLE / "val"),
        "--ckpt_dir",
        str(out),
        "--epochs",
        "1",
        "--max_steps_per_epoch",
        "2",
        "--eval_pairs",
        "200",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": pythonpath(), **_env()})
    if r.returncode != 0:
        raise SystemExit(f"training the {align} checkpoint failed:\n{r.stderr[-3000:]}")
    return out / "backbone_best.pt"


def _env() -> dict:
    import os

    return dict(os.environ)


async def lone(server: Server, files: dict, seconds: float, parts: dict | None = None) -> list[float]:
    """Back-to-back /verify latencies (s); each response's Server-Timing parts (ms) go to `parts`."""
    client = RawClient(server.base)
    req = RawClient.multipart("/verify", files, "bench")
    times = []
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            t = time.perf_counter()
            status, body = await client.send(0, req)
            if status != 200:
                raise SystemExit(f"/verify answered {status}: {body[:300]!r}")
            times.append(time.perf_counter() - t)
            if parts is not None:
                for name, ms in client.server_timing(0).items():
                    parts.setdefault(name, []).append(ms)
    finally:
        await client.close()
    return times


async def load(server: Server, image: tuple[str, bytes], clients: int, seconds: float) -> float:
    client = RawClient(server.base)
    req = RawClient.multipart("/embed", {"image": (image[0], image[1], "image/jpeg")}, "bench")
    done = 0
    end = time.perf_counter() + seconds

    async def one(task: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            status, body = await client.send(task, req)
            if status != 200:
                raise SystemExit(f"/embed answered {status}: {body[:300]!r}")
            done += 1

    t = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(clients)))
    finally:
        await client.close()
    return done / (time.perf_counter() - t)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks per measurement and server")
    p.add_argument("--seconds", type=float, default=4, help="length of each block")
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="align_cost-"))
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    print("training the two quick checkpoints ...", flush=True)
    ckpts = {a: train(a, work / a) for a in ("none", "arcface")}
    (n1, b1), (n2, b2) = sample_images(40)[0], sample_images(40)[30]
    crops = {"image1": (n1, b1, "image/jpeg"), "image2": (n2, b2, "image/jpeg")}
    rng = np.random.default_rng(0)
    s1, _ = make_scene([Image.open(io.BytesIO(b1))], rng, size=(720, 540))
    s2, _ = make_scene([Image.open(io.BytesIO(b2))], rng, size=(720, 540))
    scenes = {"image1": ("s1.jpg", jpeg(s1), "image/jpeg"), "image2": ("s2.jpg", jpeg(s2), "image/jpeg")}
    phone = (4032, 3024)
    p1, p2 = (jpeg(s.resize(phone, Image.Resampling.BICUBIC)) for s in (s1, s2))
    phones = {"image1": ("p1.jpg", p1, "image/jpeg"), "image2": ("p2.jpg", p2, "image/jpeg")}
    results: dict[str, dict[str, list[float]]] = {
        a: {"crops": [], "scenes": [], "phones": [], "load": []} for a in ckpts
    }
    # per model and photo kind: Server-Timing part -> milliseconds of each lone request
    parts: dict[str, dict[str, dict[str, list[float]]]] = {a: {} for a in ckpts}
    env = {"FACEID_CACHE_DIR": str(work / "cache")}
    with Server(ckpts["none"], env=env) as plain, Server(ckpts["arcface"], env=env) as aligned:
        servers = {"none": plain, "arcface": aligned}
        for s in servers.values():  # warm up: first requests load lazily built pieces
            asyncio.run(lone(s, crops, 1.0))
            asyncio.run(lone(s, scenes, 1.0))
            asyncio.run(lone(s, phones, 1.0))
            asyncio.run(load(s, (n1, b1), args.clients, 1.0))
        for block in range(args.blocks):
            order = ("none", "arcface") if block % 2 == 0 else ("arcface", "none")
            for a in order:
                for kind, files in (("crops", crops), ("scenes", scenes), ("phones", phones)):
                    timing = parts[a].setdefault(kind, {})
                    results[a][kind] += asyncio.run(lone(servers[a], files, args.seconds, timing))
                results[a]["load"].append(asyncio.run(load(servers[a], (n1, b1), args.clients, args.seconds)))
            print(f"block {block + 1}/{args.blocks} done", flush=True)
    med = {a: {k: statistics.median(v) for k, v in r.items()} for a, r in results.items()}
    print(f"\n{started}, {machine()}, {args.blocks} alternating blocks of {args.seconds:g} s per row and server")
    print("| measurement | unaligned | aligned | aligned / unaligned |")
    print("|---|---|---|---|")
    for key, what, unit, scale in (
        ("crops", "lone /verify, two 154 px face crops", "ms", 1000),
        ("scenes", "lone /verify, two 720x540 scene photos", "ms", 1000),
        ("phones", "lone /verify, two 4032x3024 phone-size photos", "ms", 1000),
        ("load", f"/embed with {args.clients} clients", "images/s", 1),
    ):
        u, a = med["none"][key] * scale, med["arcface"][key] * scale
        print(f"| {what} | {u:.1f} {unit} | {a:.1f} {unit} | {a / u:.2f}x |")
    print("\nWhere a lone /verify's time went (Server-Timing medians, ms; decode: both photos, two threads at once):")
    names = ("decode", "detect", "forward", "total")
    print("| photos | model | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for kind in ("crops", "scenes", "phones"):
        for a, label in (("none", "unaligned"), ("arcface", "aligned")):
            got = parts[a].get(kind, {})
            cells = [f"{statistics.median(got[n]):.1f}" if got.get(n) else "-" for n in names]
            print(f"| {kind} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
