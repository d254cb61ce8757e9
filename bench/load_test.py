#!/usr/bin/env python
"""Load test of the REST service: a real uvicorn server under 16 concurrent
/verify clients for a bounded time, /health polled meanwhile, optionally with a training job
running; prints requests, errors, wrong answers, p50/p99 latency of /verify and /health, and the
server's memory after warm-up and at the end. Asserts nothing.

    .venv/bin/python bench/load_test.py                          # 16 clients, 20 s, no job
    .venv/bin/python bench/load_test.py --train_job --seconds 30 # with a training job running
    .venv/bin/python bench/load_test.py --checkpoint models/jobs/<id>/backbone_best.pt

Correct answers: every /verify pair is sent once alone first; under load each answer must give
the same similarity (within 1e-3: batching changes float rounding only) and `match`, else it
counts as wrong. Memory: VmRSS of the server process after the warm-up (default 5 s of the same
load) and at the end, and its maximum sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import (
    Server,
    async_client,
    ensure_checkpoint,
    loadavg,
    machine,
    percentile,
    rss_mb,
    run_clients,
    sample_images,
)

TRAIN_JOB = {
    "preset": "cpu-small",
    "train": "sample/train",
    "val": "sample/val",
    "epochs": 50,
    "img_size": 64,
    "batch_size": 32,
    "workers": 0,
    "eval_pairs": 500,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=20, help="measured load time")
    p.add_argument("--warmup", type=float, default=5, help="load before measuring (not counted)")
    p.add_argument("--clients", type=int, default=16, help="concurrent /verify clients")
    p.add_argument("--health_interval", type=float, default=0.1, help="seconds between /health polls")
    p.add_argument("--checkpoint", help="serve this checkpoint (default: a quick one trained here)")
    p.add_argument("--img_size", type=int, default=64, help="of the quick checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--train_job", action="store_true", help="run a training job (cpu-small on data/sample, 64 px) during the load"
    )
    p.add_argument("--pairs", type=int, default=8, help="distinct image pairs sent")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, measure, stop it; the figures as a dict (tests/reliability/test_load.py)."""
    ckpt = ensure_checkpoint(args.checkpoint, args.img_size)
    images = sample_images(args.pairs + 1)
    pairs = [(images[i], images[i + 1 if i % 2 else i]) for i in range(args.pairs)]  # same and different
    load_before = loadavg()
    print(f"machine: {machine()}; load average {load_before}", flush=True)
    with Server(ckpt, device=args.device) as server:
        result = asyncio.run(measure(args, server, pairs))
    result["load_before"], result["load_after"] = load_before, loadavg()
    result["checkpoint"] = ckpt
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_table(args, result["checkpoint"], result)
    return 0


async def measure(args, server: Server, pairs) -> dict[str, Any]:
    verify_lat: list[float] = []
    health_lat: list[float] = []
    counts = {"requests": 0, "errors": 0, "wrong": 0}
    error_kinds: dict[str, int] = {}
    reference: dict[int, tuple[float, bool]] = {}
    recording = False
    rss_samples: list[float] = []
    stop = asyncio.Event()

    def files(k: int) -> dict:
        (n1, b1), (n2, b2) = pairs[k]
        return {"image1": (n1, b1, "image/jpeg"), "image2": (n2, b2, "image/jpeg")}

    async with async_client(server.base, args.clients + 4) as client:
        for k in range(len(pairs)):  # the reference answers, one request at a time
            r = await client.post("/verify", files=files(k))
            r.raise_for_status()
            reference[k] = (r.json()["similarity"], r.json()["match"])

        async def one(c: httpx.AsyncClient, task: int, i: int) -> None:
            k = (task + i) % len(pairs)
            t0 = time.perf_counter()
            try:
                r = await c.post("/verify", files=files(k))
                ok = r.status_code == 200
                kind = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                ok, kind, r = False, type(e).__name__, None
            dt = time.perf_counter() - t0
            if not recording:
                return
            counts["requests"] += 1
            verify_lat.append(dt)
            if not ok:
                counts["errors"] += 1
                error_kinds[kind] = error_kinds.get(kind, 0) + 1
                return
            sim, match = r.json()["similarity"], r.json()["match"]
            if abs(sim - reference[k][0]) > 1e-3 or match != reference[k][1]:
                counts["wrong"] += 1

        async def health() -> None:
            async with async_client(server.base, 2) as hc:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        ok = (await hc.get("/health")).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if recording:
                        health_lat.append(time.perf_counter() - t0)
                        if not ok:
                            counts["health_errors"] = counts.get("health_errors", 0) + 1
                    await asyncio.sleep(args.health_interval)

        async def memory() -> None:
            while not stop.is_set():
                if recording:
                    rss_samples.append(rss_mb(server.pid))
                await asyncio.sleep(0.5)

        job_id = None
        if args.train_job:
            r = await client.post("/jobs", json=TRAIN_JOB)
            r.raise_for_status()
            job_id = r.json()["id"]
            for _ in range(600):  # until it trains (setup decodes the sample first)
                job = (await client.get(f"/jobs/{job_id}")).json()
                if job["status"] != "queued" and (job.get("progress") or {}).get("step"):
                    break
                await asyncio.sleep(0.5)
            print(
                f"training job {job_id}: {job['status']}, epoch {job['progress']['epoch']} "
                f"step {job['progress']['step']}",
                flush=True,
            )

        background = [asyncio.create_task(health()), asyncio.create_task(memory())]
        await run_clients(args.clients, args.warmup, one, client)  # warm-up, not recorded
        rss_warm = rss_mb(server.pid)
        recording = True
        wall = await run_clients(args.clients, args.seconds, one, client)
        recording = False
        rss_end = rss_mb(server.pid)
        stop.set()
        await asyncio.gather(*background)
        job = None
        if job_id:
            job = (await client.get(f"/jobs/{job_id}")).json()
            await client.post(f"/jobs/{job_id}/cancel")
    return {
        "verify": verify_lat,
        "health": health_lat,
        "counts": counts,
        "error_kinds": error_kinds,
        "wall": wall,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "rss_max": max(rss_samples or [rss_end]),
        "job": job,
    }


def print_table(args, ckpt: Path, res: dict[str, Any]) -> None:
    c = res["counts"]
    ms = lambda v: f"{1000 * v:.1f}"  # noqa: E731
    v, h = res["verify"], res["health"]
    print()
    print(
        f"load test: {args.clients} clients x POST /verify for {args.seconds:g} s after {args.warmup:g} s "
        f"warm-up; /health every {args.health_interval:g} s; training job: "
        f"{'yes' if args.train_job else 'no'}"
    )
    print(
        f"checkpoint {ckpt}, device {args.device}; load average before {res['load_before']}, after {res['load_after']}"
    )
    print()
    print("| | requests | errors | wrong | per s | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| POST /verify | {c['requests']} | {c['errors']} | {c['wrong']} | {c['requests'] / res['wall']:.1f} | "
        f"{ms(percentile(v, 50))} | {ms(percentile(v, 90))} | {ms(percentile(v, 99))} | {ms(max(v or [0]))} |"
    )
    print(
        f"| GET /health | {len(h)} | {c.get('health_errors', 0)} | - | {len(h) / res['wall']:.1f} | "
        f"{ms(percentile(h, 50))} | {ms(percentile(h, 90))} | {ms(percentile(h, 99))} | {ms(max(h or [0]))} |"
    )
    print()
    growth = res["rss_end"] - res["rss_warm"]
    print(
        f"server RSS: {res['rss_warm']:.0f} MB after warm-up, {res['rss_end']:.0f} MB at the end "
        f"({growth:+.0f} MB, {100 * growth / res['rss_warm']:+.1f} %), max {res['rss_max']:.0f} MB"
    )
    print(f"images embedded: {2 * c['requests'] / res['wall']:.1f} /s")
    if res["error_kinds"]:
        print(f"errors: {res['error_kinds']}")
    if res["job"]:
        j = res["job"]
        p = j.get("progress") or {}
        print(
            f"training job: {j['status']}, epoch {p.get('epoch')}/{p.get('epochs')}, "
            f"{p.get('images_per_s')} img/s (cancelled at the end)"
        )


if __name__ == "__main__":
    sys.exit(main())
