#!/usr/bin/env python
"""Serving throughput: POST /embed images/s through the real server with 1, 4
and 16 concurrent clients against the offline batched rate of the same model, in one run; and
the single-client latency against one single-image forward pass. Prints the ratios; asserts
nothing.

    .venv/bin/python bench/serve_throughput.py                        # about 7 min here
    .venv/bin/python bench/serve_throughput.py --checkpoint PATH --seconds 15 --clients 1,4,16,32
    .venv/bin/python bench/serve_throughput.py --compile off,freeze --batch_wait_ms 0,2   # compare settings
    .venv/bin/python bench/serve_throughput.py --omp PASSIVE,spin10k      # how OpenMP threads wait

What is compared:
  offline batched   faceid.inference.Verifier.embed_tensors on uint8 batches of --batch (the
                    server's FACEID_BATCH_MAX_SIZE, 16) already decoded and resized: the model's
                    forward pass and nothing else, in this process, before the server starts, on
                    one worker thread like the server's, with OMP_WAIT_POLICY=PASSIVE (on this
                    busy 2-core machine OpenMP threads spin-waiting made a forward pass up to 20x
                    slower, erratically; the server runs with the environment you give it)
  offline single    embed_tensors on one image: one forward pass (median)
  decode            faceid.images.open_image + resize of the JPEG sent (median), which the server
                    does per request on top of the forward pass
  server N clients  N clients calling /embed back to back for --seconds after --warmup seconds,
                    each on its own keep-alive connection; images/s = answers / wall time, latency
                    per request
  goal pairs        --pairs (8) interleaved pairs of --pair_seconds (4) blocks over
                    --pair_processes (2) fresh couples of an offline process and a server: the
                    offline single forward pass then the server with 1 client, the offline batched
                    rates then the server with the most clients, one block right after the other,
                    the order flipped every pair. The two serving targets (16 clients at 80 % of
                    the offline batched rate, a lone request within 1.10x one forward pass) are
                    judged on the medians of the pairs' ratios: a small VM's speed can drift by
                    25 % within minutes, so rows measured a minute apart decide ratios by chance.
                    The reference for the most clients is the offline mode (one pass of the batch,
                    or passes at once) that is faster on the medians. "service" is each request's
                    latency minus its own forward pass (Server-Timing), which does not depend on
                    the machine's speed at all; "CPU stolen" is the hypervisor's share
  goal rounds       --rounds (0) times: a fresh process's offline rows, then a fresh server with 1
                    client and with the most clients (blocks a minute apart)
  CPU per request   where the cores went during each server row (/proc): the server's forward-pass
                    threads, the rest of the server (HTTP, multipart, decoding, answering), the
                    clients, and idle

The server and this process share the machine: while the server is measured this process only
runs the clients (one asyncio thread). By default they are lean raw HTTP/1.1 connections (about
0.1 ms of CPU per request here, like a load generator written in C); `--client httpx` uses
httpx.AsyncClient instead (about 3 ms per request, taken from the server's two cores).
"""

from __future__ import annotations

import os

# Before torch is imported (the offline rows); the server does not inherit it (see Server below).
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_common import (  # noqa: E402
    RawClient,
    Server,
    async_client,
    cpu_seconds,
    cpu_ticks,
    ensure_checkpoint,
    loadavg,
    machine,
    percentile,
    run_clients,
    sample_images,
    steal_share,
)


def concurrent_rate(v: Any, x: Any, workers: int, seconds: float) -> float:
    """Images/s of `workers` threads each embedding batch `x` back to back at once, torch's compute
    threads shared out between them (what the server's inference workers do under load)."""
    import threading

    import torch

    before, v.concurrent = torch.get_num_threads(), True
    torch.set_num_threads(max(1, before // workers))
    counts = [0] * workers
    v.embed_tensors(x)  # warm-up at this thread count
    t0 = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - t0 < seconds:
            v.embed_tensors(x)
            counts[i] += len(x)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(counts) / (time.perf_counter() - t0)
    torch.set_num_threads(before)
    v.concurrent = False
    return rate


class OfflineModel:
    """The served model's forward pass measured on its own: loaded and warmed up once, then
    measured for as many blocks as asked (the paired mode alternates blocks with a server's)."""

    def __init__(
        self, ckpt: Path, device: str, batch: int, jpeg: bytes, compile: str = "off", workers: int = 1
    ) -> None:
        from faceid.inference import Verifier

        self.v = v = Verifier.from_checkpoint(ckpt, device=device, compile=compile)
        v.warmup(batch)  # with compile=freeze: compiles every padded batch size, as the server does
        self.jpeg, self.batch, self.workers, self.compile = jpeg, batch, workers, compile
        self.x1 = v.prepare(v.read(jpeg)).unsqueeze(0)  # as the server decodes an upload
        self.xb = self.x1.repeat(batch, 1, 1, 1)
        for _ in range(3):  # warm-up (oneDNN primitives, allocator)
            v.embed_tensors(self.xb)
            v.embed_tensors(self.x1)

    def batched(self, seconds: float) -> dict[str, Any]:
        """Images/s of one pass of the whole batch at a time on all threads, and of as many passes
        at once as the server's workers, each on a share of the batch and of the threads (a
        compiled model runs them one at a time, so only the eager one is measured that way); each
        for `seconds`."""
        v, n, t0 = self.v, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            v.embed_tensors(self.xb)
            n += self.batch
        rate = n / (time.perf_counter() - t0)
        rate_w = (
            concurrent_rate(v, self.x1.repeat(max(1, self.batch // self.workers), 1, 1, 1), self.workers, seconds)
            if self.workers > 1 and self.compile == "off" and v.device.type == "cpu"
            else float("nan")
        )
        return {
            "batched": max(rate, rate_w) if rate_w == rate_w else rate,
            "batched_1": rate,
            "batched_w": rate_w,
            "workers": self.workers,
        }

    def single(self, seconds: float) -> float:
        """Median seconds of one image's forward pass, back to back for `seconds` (10 at least)."""
        singles: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(singles) < 10:
            t = time.perf_counter()
            self.v.embed_tensors(self.x1)
            singles.append(time.perf_counter() - t)
        return statistics.median(singles)

    def decode(self) -> float:
        decodes = []
        for _ in range(30):
            t = time.perf_counter()
            self.v.prepare(self.v.read(self.jpeg))
            decodes.append(time.perf_counter() - t)
        return statistics.median(decodes)


def offline(
    ckpt: Path, device: str, batch: int, seconds: float, jpeg: bytes, compile: str = "off", workers: int = 1
) -> dict[str, Any]:
    import torch

    m = OfflineModel(ckpt, device, batch, jpeg, compile, workers)
    out = {
        **m.batched(seconds),
        "single": m.single(seconds / 2),
        "decode": m.decode(),
        "threads": torch.get_num_threads(),
        "img_size": m.v.img_size,
    }
    del m
    gc.collect()
    return out


def offline_serve(ckpt: Path, args: argparse.Namespace, jpeg: bytes) -> None:
    """A child for the paired mode: loads the model once, then answers one JSON line per command
    line on stdin ("single SECONDS" or "batched SECONDS"), measured on one worker thread like the
    server's; "ready" first."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        m = pool.submit(OfflineModel, ckpt, args.device, args.batch, jpeg, args.compile, args.offline_workers).result()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            what, seconds = line.split()
            fn = m.single if what == "single" else m.batched
            print(json.dumps({what: pool.submit(fn, float(seconds)).result()}), flush=True)


class OfflineChild:
    """A fresh process running `offline_serve`; `measure("single", 3)` -> its answer."""

    def __init__(self, policy: str, ckpt: Path, args: argparse.Namespace, mode: str) -> None:
        cmd, env = child_command("--offline_serve", policy, ckpt, args, mode)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the offline child ended (exit {self.proc.wait()})")
        return json.loads(line)

    def measure(self, what: str, seconds: float) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{what} {seconds}\n")
        self.proc.stdin.flush()
        return self._read()[what]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --omp: how OpenMP threads wait, for the offline rows (a child process each) and the server alike
OMP_POLICIES = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child_command(
    flag: str, policy: str, ckpt: Path, args: argparse.Namespace, mode: str
) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a fresh offline process of this script (`flag`: --offline_json
    or --offline_serve), with OpenMP setting `policy` ("" = this process's)."""
    env = dict(os.environ)
    if policy:
        env = {k: v for k, v in env.items() if k not in OMP_VARS}
        env.update(OMP_POLICIES[policy])
    cmd = [
        sys.executable,
        __file__,
        flag,
        "--checkpoint",
        str(ckpt),
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--seconds",
        str(args.seconds),
        "--compile",
        mode,
        "--offline_workers",
        str(args.offline_workers),
    ]
    return cmd, env


def server_env(mode: str, pol: str, wait: float, bmax: int, iw: int) -> tuple[dict[str, str], tuple[str, ...]]:
    """(FACEID_* and OpenMP settings, variables to unset) of a server under test. Without a setting
    of the user's (or --omp), the server applies its own OpenMP default (app.main)."""
    env = {
        "FACEID_BATCH_MAX_SIZE": str(bmax),
        "FACEID_BATCH_WAIT_MS": str(wait),
        "FACEID_COMPILE": mode,
        "FACEID_INFER_WORKERS": str(iw),
        **OMP_POLICIES.get(pol, {}),
    }
    return env, (OMP_VARS if pol or USER_OMP_WAIT_POLICY is None else ())


def offline_in_child(policy: str, ckpt: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The offline rows measured in a fresh process, with OpenMP setting `policy` ("" = this
    process's)."""
    cmd, env = child_command("--offline_json", policy, ckpt, args, mode)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


async def server_rate(
    server: Server,
    clients: int,
    seconds: float,
    warmup: float,
    jpeg: tuple[str, bytes],
    client_kind: str = "raw",
    images: int = 1,
):
    """Images/s of `clients` clients sending back to back for `seconds`; with `images` > 1, each
    request carries that many (POST /embed/batch; the raw client only), and the CPU figures are
    per image."""
    lat: list[float] = []
    timings: list[dict[str, float]] = []  # the server's Server-Timing of each request, and "outside" it
    service: list[float] = []  # each request's latency minus its forward pass (ms): what the service adds
    errors = 0
    record = False

    if client_kind == "httpx":

        async def one(c, task: int, i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            r = await c.post("/embed", files={"image": (jpeg[0], jpeg[1], "image/jpeg")})
            if record:
                lat.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        c = async_client(server.base, clients + 2)
    else:
        c = RawClient(server.base)
        host = f"127.0.0.1:{server.infer_port}"
        if images > 1:
            request = RawClient.multipart("/embed/batch", [("images", (jpeg[0], jpeg[1], "image/jpeg"))] * images, host)
            expect = b'{"embeddings":[['
        else:
            request = RawClient.multipart("/embed", {"image": (jpeg[0], jpeg[1], "image/jpeg")}, host)
            expect = b'{"embedding":['
        status, body = await c.send(-1, request)  # one answer checked in full
        answer = json.loads(body) if status == 200 else {}
        if (
            status != 200
            or len(answer.get("embedding") or (answer.get("embeddings") or [[]])[-1]) < 2
            or (images > 1 and answer.get("count") != images)
        ):
            raise SystemExit(f"/embed answered {status}: {body[:300]!r}")

        async def one(c, task: int, i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            status, body = await c.send(task, request)
            if record:
                lat.append(time.perf_counter() - t0)
                errors += status != 200 or not body.startswith(expect)
                st = c.server_timing(task)
                if "total" in st:
                    timings.append({**st, "outside": 1000 * lat[-1] - st["total"]})
                if "forward" in st:
                    service.append(1000 * lat[-1] - st["forward"])

    try:
        await run_clients(clients, warmup, one, c)
        record = True
        b0 = batching(server)
        cpu0, client0 = cpu_seconds(server.pids), time.process_time()
        wall = await run_clients(clients, seconds, one, c)
        cpu1, client1 = cpu_seconds(server.pids), time.process_time()
        b1 = batching(server)
    finally:
        await (c.aclose() if client_kind == "httpx" else c.close())
    n = max(1, len(lat) * images)
    # CPU milliseconds per image: where the two cores went (clock-tick resolution, 10 ms, over
    # seconds of load)
    cpu = {
        "cpu_forward": 1000 * (cpu1[1] - cpu0[1]) / n,
        "cpu_server_rest": 1000 * ((cpu1[0] - cpu1[1]) - (cpu0[0] - cpu0[1])) / n,
        "cpu_client": 1000 * (client1 - client0) / n,
        "cpu_idle": 1000 * max(0.0, (os.cpu_count() or 1) * wall - (cpu1[0] - cpu0[0]) - (client1 - client0)) / n,
    }
    batches = b1["batches"] - b0["batches"]
    return {
        "clients": clients,
        "rate": len(lat) * images / wall,
        "images": images,
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "errors": errors,
        "n": len(lat),
        **cpu,
        "timing": {
            k: statistics.median(t[k] for t in timings if k in t) for k in TIMING_PARTS if any(k in t for t in timings)
        },
        "service": statistics.median(service) if service else float("nan"),
        "mean_batch": (b1["images"] - b0["images"]) / batches if batches else float("nan"),
    }


# Server-Timing parts of /embed (app.batcher.Timing), then the rest of the client's latency
TIMING_PARTS = ("read", "decode", "queue", "forward", "handback", "total", "outside")


def batching(server: Server) -> dict[str, Any]:
    """The server's own count of forward passes and images (GET /model's `batching`)."""
    if server.replicas:  # each replica batches on its own and has no GET /model: not counted
        return {"batches": 0, "images": 0}
    return httpx.get(server.api + "/model", timeout=30).json()["batching"]


def run_pairs(
    args: argparse.Namespace,
    ckpt: Path,
    key: tuple[str, str],
    plans: dict[int, int],
    wait: float,
    bmax: int,
    most: int,
    jpeg: tuple[str, bytes],
    replicas: int = 0,
    images: int = 1,
) -> list[dict[str, Any]]:
    """The serving targets measured in interleaved pairs: blocks of the offline forward pass and of the
    server, one right after the other, so that both see the same state of the machine (its speed
    drifts by 25 % within minutes here); the order flips every pair."""
    mode, pol = key
    iw = next(iter(plans))
    env, unset = server_env(mode, pol, wait, bmax, iw)
    sec = args.pair_seconds
    couples = max(1, min(args.pair_processes, args.pairs))
    pairs: list[dict[str, Any]] = []
    for c in range(couples):
        count = args.pairs // couples + (c < args.pairs % couples)
        child = OfflineChild(pol, ckpt, args, mode)
        try:
            with Server(ckpt, device=args.device, env=env, unset=unset, replicas=replicas) as server:
                asyncio.run(server_rate(server, most, 1, 1, jpeg, args.client))  # warm both up once
                for _ in range(count):
                    k = len(pairs)
                    offline_first = k % 2 == 0
                    r: dict[str, Any] = {"couple": c + 1, "offline_first": offline_first}
                    ticks = cpu_ticks()
                    for part in ("single", "batched"):
                        clients = 1 if part == "single" else most
                        for side in ("offline", "server") if offline_first else ("server", "offline"):
                            if side == "offline":
                                r[part] = child.measure(part, sec)
                            else:
                                r[f"server_{part}"] = asyncio.run(
                                    server_rate(
                                        server,
                                        clients,
                                        sec,
                                        0.5 if clients == 1 else 1.0,
                                        jpeg,
                                        args.client,
                                        1 if clients == 1 else images,
                                    )
                                )
                    one, many, b = r["server_single"], r["server_batched"], r["batched"]
                    pairs.append(
                        {
                            "couple": c + 1,
                            "offline_first": offline_first,
                            "single": r["single"],
                            "p50": one["p50"],
                            "p99": one["p99"],
                            "service": one["service"],
                            "server_forward": one["timing"].get("forward", float("nan")),
                            "batched": b["batched"],
                            "batched_1": b["batched_1"],
                            "batched_w": b["batched_w"],
                            "rate_most": many["rate"],
                            "mean_batch_most": many["mean_batch"],
                            "steal": steal_share(ticks, cpu_ticks()),
                        }
                    )
                    p_ = pairs[-1]
                    print(
                        f"pair {k + 1} (couple {c + 1}): offline single {1000 * p_['single']:.1f} ms, 1 client p50 "
                        f"{1000 * p_['p50']:.1f} ms; offline batched {p_['batched']:.1f} img/s, {most} clients "
                        f"{p_['rate_most']:.1f} img/s",
                        flush=True,
                    )
        finally:
            child.close()
    return pairs


def print_pairs(
    args: argparse.Namespace,
    pairs: list[dict[str, Any]],
    key: tuple[str, str],
    plans: dict[int, int],
    wait: float,
    bmax: int,
    most: int,
    replicas: int = 0,
) -> None:
    mode, pol = key
    images = int(args.images_per_request.split(",")[0])
    passes = replicas or plans[next(iter(plans))]
    print()
    print(
        f"The serving targets in {len(pairs)} interleaved pairs of {args.pair_seconds:g} s blocks over "
        f"{max(p['couple'] for p in pairs)} fresh (offline process, server) couples (compile {mode}"
        f"{', ' + pol if pol else ''}, wait {wait:g} ms, max {bmax}, "
        f"{f'{replicas} inference replicas' if replicas else f'workers {passes}'}"
        f"{f'; {most} clients send {images} images per request' if images > 1 else ''}): each "
        f"pair measures the offline single forward pass and the server with 1 client, then the offline batched "
        f"rate (one pass at a time, and passes at once) and the server with {most} clients, one "
        "block right after the other, the order flipped every pair; service = each request's latency minus "
        "its own forward pass (Server-Timing); CPU stolen = the share of the machine's CPU time the "
        "hypervisor gave to others during the pair (/proc/stat)"
    )
    print()
    # The reference for the most clients: the offline mode (one pass of the whole batch at a time, or
    # passes at once) that is faster on the median over the pairs; not the faster one of each pair,
    # which would pick the luckier of two noisy figures every time.
    modes = {"batched_1": f"one pass of {args.batch} at a time"}
    if all(r["batched_w"] == r["batched_w"] for r in pairs):
        modes["batched_w"] = f"{passes} passes of {args.batch // max(1, passes)} at once"
    ref = max(modes, key=lambda m: statistics.median(r[m] for r in pairs))
    print(
        f"| pair | couple | first | offline single forward ms | 1 client p50 ms | p99 ms | server forward ms | "
        f"service ms | p50 / offline forward | offline img/s, {' | offline img/s, '.join(modes.values())} | "
        f"{most} clients img/s | images per pass | share | CPU stolen |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(modes) + "---:|---:|---:|---:|")
    for k, r in enumerate(pairs, 1):
        print(
            f"| {k} | {r['couple']} | {'offline' if r['offline_first'] else 'server'} | {1000 * r['single']:.1f} | "
            f"{1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} | {r['server_forward']:.1f} | {r['service']:.2f} | "
            f"{r['p50'] / r['single']:.2f}x | "
            + " | ".join(f"{r[m]:.1f}" for m in modes)
            + f" | {r['rate_most']:.1f} | {r['mean_batch_most']:.1f} | {100 * r['rate_most'] / r[ref]:.0f} % | "
            f"{100 * r['steal']:.1f} % |"
        )
    ratio = statistics.median(r["p50"] / r["single"] for r in pairs)
    share = statistics.median(r["rate_most"] / r[ref] for r in pairs)
    service = statistics.median(r["service"] for r in pairs)
    single = statistics.median(r["single"] for r in pairs)
    ratios = sorted(r["p50"] / r["single"] for r in pairs)
    shares = sorted(r["rate_most"] / r[ref] for r in pairs)
    print()
    print(
        f"pairs (medians of the pairs' ratios): {most} clients at {100 * share:.0f} % of the offline batched "
        f"rate ({modes[ref]}, the faster mode on the medians: "
        + ", ".join(f"{statistics.median(r[m] for r in pairs):.1f} img/s {modes[m]}" for m in modes)
        + f"; goal: at least 80 %; pairs {100 * shares[0]:.0f} to {100 * shares[-1]:.0f} %"
        + (
            f"; against {modes['batched_1']}: "
            f"{100 * statistics.median(r['rate_most'] / r['batched_1'] for r in pairs):.0f} %"
            if ref != "batched_1"
            else ""
        )
        + f"); single-client p50 {ratio:.2f}x the offline forward pass (goal: at most 1.10x; pairs "
        f"{ratios[0]:.2f} to {ratios[-1]:.2f}x); the service adds {service:.2f} ms per request = "
        f"{service / (1000 * single):.1%} of a {1000 * single:.1f} ms forward pass"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", help="serve this checkpoint (default: a quick one trained here)")
    p.add_argument("--img_size", type=int, default=64, help="of the quick checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (server and offline alike)")
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrent client counts")
    p.add_argument("--seconds", type=float, default=8, help="measured time per client count")
    p.add_argument("--warmup", type=float, default=2, help="unmeasured load before each count")
    p.add_argument("--batch", type=int, default=16, help="offline batch = FACEID_BATCH_MAX_SIZE")
    p.add_argument(
        "--compile",
        default="off",
        help="FACEID_COMPILE (off, freeze); a comma list measures each, offline and through a server, in the same run",
    )
    p.add_argument(
        "--batch_wait_ms",
        default="5",
        help="FACEID_BATCH_WAIT_MS of the server; a comma list "
        "(e.g. 0,2) measures one server per value in the same run",
    )
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw = lean HTTP/1.1 keep-alive connections (about 0.1 ms of CPU per "
        "request here); httpx = httpx.AsyncClient (about 3 ms per request, taken from the server's cores)",
    )
    p.add_argument(
        "--server_batch",
        default="",
        help="FACEID_BATCH_MAX_SIZE of the server (default: --batch); a "
        "comma list measures one server per value against the same offline batched rate",
    )
    p.add_argument(
        "--omp",
        default="",
        help=f"comma list of OpenMP wait settings ({', '.join(OMP_POLICIES)}) "
        "measured side by side, offline rows (in a child process each) and server alike; "
        "default: this process PASSIVE, the server its own default",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="after the rows above, this many rounds of (a fresh process's offline rows, a fresh "
        "server with 1 client and with the most clients), alternating: a process's forward pass "
        "speed varies between processes here, so the serving targets are judged on the medians; 0: none",
    )
    p.add_argument(
        "--infer_workers",
        default="0",
        help="FACEID_INFER_WORKERS of the server (0: it decides, "
        "app.model_manager.inference_plan); a comma list measures one server per value",
    )
    p.add_argument(
        "--replicas",
        default="0",
        help="FACEID_INFER_REPLICAS of the server: clients then send to the "
        "replicas' port, and CPU time counts the replicas' processes; a comma list measures one server "
        "per value; the pairs use the first",
    )
    p.add_argument(
        "--images_per_request",
        default="1",
        help="images each request carries (more than 1: POST "
        "/embed/batch, the raw client); a comma list measures each on every server; the pairs use the first",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=8,
        help="after the rows above, this many interleaved pairs of blocks judge the serving targets: the "
        "offline single forward pass and the server with 1 client, the offline batched rate and the "
        "server with the most clients, each block --pair_seconds long, one after the other with the "
        "order flipped every pair, split over --pair_processes fresh (offline process, server) "
        "couples; goals on the medians of the pairs' ratios; 0: none",
    )
    p.add_argument("--pair_seconds", type=float, default=4, help="length of each block of the pairs")
    p.add_argument("--pair_processes", type=int, default=2, help="fresh process couples the pairs are split over")
    p.add_argument("--offline_json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offline_serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offline_workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from app.model_manager import inference_plan

    # The offline reference is the faster of one pass at a time on all threads and as many passes
    # at once as the server's most workers, so a server with workers is held to that rate too.
    plans = {int(w): inference_plan(int(w), args.device)[0] for w in args.infer_workers.split(",")}
    if not args.offline_workers:  # replicas run one pass each, at once
        args.offline_workers = max(*plans.values(), *(int(x) for x in args.replicas.split(",")))

    jpeg = sample_images(1)[0]
    if args.offline_json:  # a child: the offline rows in a fresh process (its own OpenMP setting)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            print(
                json.dumps(
                    pool.submit(
                        offline,
                        Path(args.checkpoint),
                        args.device,
                        args.batch,
                        args.seconds,
                        jpeg[1],
                        args.compile,
                        args.offline_workers,
                    ).result()
                )
            )
        return 0
    if args.offline_serve:  # a child of the paired mode
        offline_serve(Path(args.checkpoint), args, jpeg[1])
        return 0
    ckpt = ensure_checkpoint(args.checkpoint, args.img_size)
    load_before = loadavg()
    print(f"machine: {machine()}; load average {load_before}", flush=True)
    modes = args.compile.split(",")
    policies = [x for x in args.omp.split(",") if x]
    unknown = [x for x in policies if x not in OMP_POLICIES]
    if unknown:
        p.error(f"--omp: unknown {unknown}; choose from {','.join(OMP_POLICIES)}")
    # (compile mode, OpenMP setting): "" = this process's setting and the server's own default
    keys = [(m, pol) for m in dict.fromkeys(modes) for pol in (policies or [""])]
    offs = {}
    for mode, pol in keys:
        if pol:
            offs[(mode, pol)] = offline_in_child(pol, ckpt, args, mode)
        else:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the server's EmbedWorker is a thread too
                offs[(mode, pol)] = pool.submit(
                    offline, ckpt, args.device, args.batch, args.seconds, jpeg[1], mode, args.offline_workers
                ).result()
        o = offs[(mode, pol)]
        print(
            f"offline, compile {mode}{', ' + pol if pol else ''}: {o['batched_1']:.1f} img/s batched, "
            f"{o['batched_w']:.1f} img/s with {o['workers']} passes at once, {1000 * o['single']:.1f} ms single",
            flush=True,
        )
    rows = []
    waits = [float(w) for w in args.batch_wait_ms.split(",")]
    bmaxes = [int(b) for b in (args.server_batch or str(args.batch)).split(",")]
    replicas = [int(x) for x in args.replicas.split(",")]
    per_request = [int(x) for x in args.images_per_request.split(",")]
    for mode, pol, wait, bmax, iw, nrep in [
        (m, p_, w, b, i, n) for m, p_ in keys for w in waits for b in bmaxes for i in plans for n in replicas
    ]:
        env, unset = server_env(mode, pol, wait, bmax, iw)
        with Server(ckpt, device=args.device, env=env, unset=unset, replicas=nrep) as server:
            for n, k in [(n, k) for k in per_request for n in (int(x) for x in args.clients.split(","))]:
                rows.append(
                    {
                        **asyncio.run(server_rate(server, n, args.seconds, args.warmup, jpeg, args.client, k)),
                        "wait": wait,
                        "bmax": bmax,
                        "compile": mode,
                        "omp": pol,
                        "workers": (f"{nrep} replicas" if nrep else str(plans[iw]))
                        + (f", {k} images per request" if k > 1 else ""),
                    }
                )
                print(
                    f"server, compile {mode}{', ' + pol if pol else ''}, wait {wait:g} ms, max batch {bmax}, "
                    f"workers {rows[-1]['workers']}, {n} clients: "
                    f"{rows[-1]['rate']:.1f} img/s",
                    flush=True,
                )
    rounds = []
    most = max(int(x) for x in args.clients.split(","))
    if args.rounds > 0:
        mode, pol = keys[0]
        iw = next(iter(plans))
        env, unset = server_env(mode, pol, waits[0], bmaxes[0], iw)
        for k in range(args.rounds):
            o = offline_in_child(pol, ckpt, args, mode)
            with Server(ckpt, device=args.device, env=env, unset=unset) as server:
                one = asyncio.run(server_rate(server, 1, args.seconds, args.warmup, jpeg, args.client))
                many = asyncio.run(server_rate(server, most, args.seconds, args.warmup, jpeg, args.client))
            rounds.append(
                {
                    "single": o["single"],
                    "batched": o["batched"],
                    **one,
                    "rate_most": many["rate"],
                    "mean_batch_most": many["mean_batch"],
                }
            )
            print(
                f"round {k + 1}: offline {o['batched']:.1f} img/s batched, single forward {1000 * o['single']:.1f} ms "
                f"(fresh process); {most} clients {many['rate']:.1f} img/s, 1 client p50 {1000 * one['p50']:.1f} ms "
                f"(fresh server)",
                flush=True,
            )
    pairs = (
        run_pairs(args, ckpt, keys[0], plans, waits[0], bmaxes[0], most, jpeg, replicas[0], per_request[0])
        if args.pairs > 0
        else []
    )
    load_after = loadavg()
    off = offs[keys[0]]

    print()
    omp_note = (
        f"OpenMP wait per row (offline rows and server alike): {', '.join(policies)}"
        if policies
        else f"server OMP_WAIT_POLICY {USER_OMP_WAIT_POLICY or 'not set (the server defaults to PASSIVE)'}"
    )
    print(
        f"serve throughput: checkpoint {ckpt} ({off['img_size']} px), device {args.device}, "
        f"torch threads {off['threads']}, batch {args.batch}, {omp_note}; "
        f"{args.seconds:g} s per row after {args.warmup:g} s warm-up"
    )
    print(f"machine: {machine()}; load average before {load_before}, after {load_after}")
    print(
        "shares are of the offline batched rate of the same compile mode and OpenMP setting: the faster of "
        "one pass of the whole batch at a time on all threads and as many passes at once as the server's "
        "most workers, each on a share of the batch and of the threads"
    )
    print()
    print(
        "| compile | omp | | images/s | share of offline batched | p50 ms | p99 ms | requests | errors | "
        "images per forward pass |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (mode, pol), o in offs.items():
        pol = pol or "-"
        best = o["batched"]
        print(
            f"| {mode} | {pol} | offline batched ({args.batch}), one pass at a time | {o['batched_1']:.1f} | "
            f"{100 * o['batched_1'] / best:.0f} % | - | - | - | - | {args.batch} |"
        )
        if o["batched_w"] == o["batched_w"]:
            print(
                f"| {mode} | {pol} | offline, {o['workers']} passes of {args.batch // o['workers']} at once | "
                f"{o['batched_w']:.1f} | {100 * o['batched_w'] / best:.0f} % | - | - | - | - | "
                f"{args.batch // o['workers']} |"
            )
        print(
            f"| {mode} | {pol} | offline single forward | {1 / o['single']:.1f} | "
            f"{100 / o['single'] / o['batched']:.0f} % | {1000 * o['single']:.1f} | - | - | - | 1 |"
        )
    for r in rows:
        o = offs[(r["compile"], r["omp"])]
        print(
            f"| {r['compile']} | {r['omp'] or '-'} | server, wait {r['wait']:g} ms, max {r['bmax']}, "
            f"workers {r['workers']}, {r['clients']} client"
            f"{'s' if r['clients'] > 1 else ''} | {r['rate']:.1f} | {100 * r['rate'] / o['batched']:.0f} % | "
            f"{1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} | {r['n']} | {r['errors']} | {r['mean_batch']:.1f} |"
        )
    print()
    print(
        "CPU milliseconds per request, over the measured seconds of each row: the server's forward-pass "
        "thread and its OpenMP threads; the rest of the server (event loop: HTTP and multipart parsing, "
        "answering; decoding threads); this process's clients; cores left idle (from /proc, 10 ms ticks)"
    )
    print()
    print("| compile | omp | server | forward | server, rest | clients | idle | offline batched forward |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        o = offs[(r["compile"], r["omp"])]
        print(
            f"| {r['compile']} | {r['omp'] or '-'} | wait {r['wait']:g} ms, max {r['bmax']}, "
            f"workers {r['workers']}, {r['clients']} client"
            f"{'s' if r['clients'] > 1 else ''} | {r['cpu_forward']:.1f} | {r['cpu_server_rest']:.1f} | "
            f"{r['cpu_client']:.1f} | {r['cpu_idle']:.1f} | {1000 * o['threads'] / o['batched']:.1f} |"
        )
    if any(r.get("timing") for r in rows):
        print()
        print(
            "Where a request's time went, median ms per request (the server's Server-Timing header: reading "
            "the upload, decoding, queueing for the worker, the forward pass of the batch it joined, the "
            "hand-back to the event loop, the handler's total; outside = the client's latency minus that "
            "total: HTTP in uvicorn and the client, middleware, the JSON answer)"
        )
        print()
        print("| compile | omp | server | " + " | ".join(TIMING_PARTS) + " |")
        print("|---|---|---|" + "---:|" * len(TIMING_PARTS))
        for r in rows:
            t = r.get("timing") or {}
            print(
                f"| {r['compile']} | {r['omp'] or '-'} | wait {r['wait']:g} ms, max {r['bmax']}, "
                f"workers {r['workers']}, {r['clients']} client"
                f"{'s' if r['clients'] > 1 else ''} | "
                + " | ".join(f"{t[k]:.2f}" if k in t else "-" for k in TIMING_PARTS)
                + " |"
            )
    if rounds:
        mode, pol = keys[0]
        print()
        print(
            f"The serving targets over {len(rounds)} rounds of a fresh process's offline rows then a fresh server "
            f"with 1 and {most} clients (compile {mode}{', ' + pol if pol else ''}, wait {waits[0]:g} ms, max "
            f"{bmaxes[0]}, workers {plans[next(iter(plans))]}); offline batched = the faster of one pass at a time "
            "and passes at once; server forward = the Server-Timing forward part, service = each request's latency "
            "minus its forward pass (median)"
        )
        print()
        print(
            f"| round | offline batched img/s | {most} clients img/s | share | offline single forward ms | "
            "1 client p50 ms | p99 ms | server forward ms | service ms | p50 / offline forward |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in enumerate(rounds, 1):
            print(
                f"| {k} | {r['batched']:.1f} | {r['rate_most']:.1f} | {100 * r['rate_most'] / r['batched']:.0f} % | "
                f"{1000 * r['single']:.1f} | {1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} | "
                f"{r['timing'].get('forward', float('nan')):.1f} | {r['service']:.2f} | "
                f"{r['p50'] / r['single']:.2f}x |"
            )

        def med(key: str) -> float:
            return statistics.median(r[key] for r in rounds)

        print()
        print(
            f"rounds: {most} clients {med('rate_most'):.1f} img/s vs offline batched {med('batched'):.1f} img/s "
            f"(medians) = {100 * med('rate_most') / med('batched'):.0f} % (goal: at least 80 %); single-client "
            f"p50 {1000 * med('p50'):.1f} ms vs offline forward pass {1000 * med('single'):.1f} ms = "
            f"{med('p50') / med('single'):.2f}x (goal: at most 1.10x); the service itself adds "
            f"{med('service'):.2f} ms per request = {med('service') / (1000 * med('single')):.1%} of a forward "
            f"pass; between processes the offline batched rate ranged {min(r['batched'] for r in rounds):.1f} to "
            f"{max(r['batched'] for r in rounds):.1f} img/s and the single forward "
            f"{1000 * min(r['single'] for r in rounds):.1f} to {1000 * max(r['single'] for r in rounds):.1f} ms"
        )
    if pairs:
        print_pairs(args, pairs, keys[0], plans, waits[0], bmaxes[0], most, replicas[0])
    print()
    best_single = min(o["single"] for o in offs.values())
    for i, r in enumerate(rows):
        o = offs[(r["compile"], r["omp"])]
        what = (
            f"compile {r['compile']}{', ' + r['omp'] if r['omp'] else ''}, wait {r['wait']:g} ms, "
            f"max batch {r['bmax']}, workers {r['workers']} (run {i})"
        )
        if r["clients"] == 1 and r.get("images", 1) == 1:
            print(
                f"{what}: single client p50 {1000 * r['p50']:.1f} ms vs one forward pass {1000 * o['single']:.1f} ms "
                f"= {r['p50'] / o['single']:.2f}x (vs the fastest offline forward here, {1000 * best_single:.1f} ms: "
                f"{r['p50'] / best_single:.2f}x; decode + resize of the JPEG alone: {1000 * o['decode']:.1f} ms)"
            )
        if r["clients"] == max(x["clients"] for x in rows):
            print(
                f"{what}: {r['clients']} clients = {100 * r['rate'] / o['batched']:.0f} % of the offline batched rate"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
