#!/usr/bin/env python
"""Serving throughput (issue 6, item 3): POST /embed images/s through the real server with 1, 4
and 16 concurrent clients against the offline batched rate of the same model, in one run; and
the single-client latency against one single-image forward pass. Prints the ratios; asserts
nothing.

    .venv/bin/python bench/serve_throughput.py                        # about 4 min here
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
  goal rounds       --rounds times: a fresh process's offline rows, then a fresh server with 1
                    client and with the most clients; issue 6's two goals (the share of the offline
                    batched rate, the single-client latency against one forward pass) are judged on
                    the medians of the rounds, because one process can compute 25 % faster than
                    another here and a single pair decided the ratios by chance. "service" is each
                    request's latency minus its own forward pass (Server-Timing), which does not
                    depend on that
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
import subprocess  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_common import (RawClient, Server, async_client, cpu_seconds, ensure_checkpoint,  # noqa: E402
                          loadavg, machine, percentile, run_clients, sample_images)


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


def offline(ckpt: Path, device: str, batch: int, seconds: float, jpeg: bytes, compile: str = "off",
            workers: int = 1) -> dict[str, Any]:
    import torch

    from faceid.images import open_image
    from faceid.inference import Verifier, to_uint8_tensor

    v = Verifier.from_checkpoint(ckpt, device=device, compile=compile)
    v.warmup(batch)  # with compile=freeze: compiles every padded batch size, as the server does
    img = open_image(jpeg)
    x1 = to_uint8_tensor(img, v.img_size).unsqueeze(0)
    xb = x1.repeat(batch, 1, 1, 1)
    for _ in range(3):  # warm-up (oneDNN primitives, allocator)
        v.embed_tensors(xb)
        v.embed_tensors(x1)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        v.embed_tensors(xb)
        n += batch
    rate = n / (time.perf_counter() - t0)
    # The server's workers: several passes at once, each on a share of the batch (a compiled model
    # runs them one at a time, so only the eager one is measured this way)
    rate_w = (concurrent_rate(v, x1.repeat(max(1, batch // workers), 1, 1, 1), workers, seconds)
              if workers > 1 and compile == "off" and v.device.type == "cpu" else float("nan"))
    singles = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2 or len(singles) < 10:
        t = time.perf_counter()
        v.embed_tensors(x1)
        singles.append(time.perf_counter() - t)
    decodes = []
    for _ in range(30):
        t = time.perf_counter()
        to_uint8_tensor(open_image(jpeg), v.img_size)
        decodes.append(time.perf_counter() - t)
    out = {"batched": max(rate, rate_w) if rate_w == rate_w else rate, "batched_1": rate, "batched_w": rate_w,
           "workers": workers, "single": statistics.median(singles), "decode": statistics.median(decodes),
           "threads": torch.get_num_threads(), "img_size": v.img_size}
    del v
    gc.collect()
    return out


# --omp: how OpenMP threads wait, for the offline rows (a child process each) and the server alike
OMP_POLICIES = {"PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def offline_in_child(policy: str, ckpt: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The offline rows measured in a fresh process, with OpenMP setting `policy` ("" = this
    process's)."""
    env = dict(os.environ)
    if policy:
        env = {k: v for k, v in env.items() if k not in OMP_VARS}
        env.update(OMP_POLICIES[policy])
    cmd = [sys.executable, __file__, "--offline_json", "--checkpoint", str(ckpt), "--device", args.device,
           "--batch", str(args.batch), "--seconds", str(args.seconds), "--compile", mode,
           "--offline_workers", str(args.offline_workers)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


async def server_rate(server: Server, clients: int, seconds: float, warmup: float, jpeg: tuple[str, bytes],
                      client_kind: str = "raw"):
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
        request = RawClient.multipart("/embed", {"image": (jpeg[0], jpeg[1], "image/jpeg")}, f"127.0.0.1:{server.port}")
        status, body = await c.send(-1, request)  # one answer checked in full
        if status != 200 or len(json.loads(body)["embedding"]) < 2:
            raise SystemExit(f"/embed answered {status}: {body[:300]!r}")

        async def one(c, task: int, i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            status, body = await c.send(task, request)
            if record:
                lat.append(time.perf_counter() - t0)
                errors += status != 200 or not body.startswith(b'{"embedding":[')
                st = c.server_timing(task)
                if "total" in st:
                    timings.append({**st, "outside": 1000 * lat[-1] - st["total"]})
                if "forward" in st:
                    service.append(1000 * lat[-1] - st["forward"])

    try:
        await run_clients(clients, warmup, one, c)
        record = True
        b0 = batching(server)
        cpu0, client0 = cpu_seconds(server.pid), time.process_time()
        wall = await run_clients(clients, seconds, one, c)
        cpu1, client1 = cpu_seconds(server.pid), time.process_time()
        b1 = batching(server)
    finally:
        await (c.aclose() if client_kind == "httpx" else c.close())
    n = max(1, len(lat))
    # CPU milliseconds per request: where the two cores went (clock-tick resolution, 10 ms, over
    # seconds of load)
    cpu = {"cpu_forward": 1000 * (cpu1[1] - cpu0[1]) / n, "cpu_server_rest": 1000 * ((cpu1[0] - cpu1[1]) - (cpu0[0] - cpu0[1])) / n,
           "cpu_client": 1000 * (client1 - client0) / n, "cpu_idle": 1000 * max(0.0, (os.cpu_count() or 1) * wall - (
               cpu1[0] - cpu0[0]) - (client1 - client0)) / n}
    batches = b1["batches"] - b0["batches"]
    return {"clients": clients, "rate": len(lat) / wall, "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "errors": errors, "n": len(lat), **cpu,
            "timing": {k: statistics.median(t[k] for t in timings if k in t) for k in TIMING_PARTS
                       if any(k in t for t in timings)},
            "service": statistics.median(service) if service else float("nan"),
            "mean_batch": (b1["images"] - b0["images"]) / batches if batches else float("nan")}


# Server-Timing parts of /embed (app.serving.Timing), then the rest of the client's latency
TIMING_PARTS = ("read", "decode", "queue", "forward", "handback", "total", "outside")


def batching(server: Server) -> dict[str, Any]:
    """The server's own count of forward passes and images (GET /model's `batching`)."""
    return httpx.get(server.base + "/model", timeout=30).json()["batching"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="serve this checkpoint (default: a quick one trained here)")
    p.add_argument("--img_size", type=int, default=64, help="of the quick checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (server and offline alike)")
    p.add_argument("--clients", default="1,4,16", help="comma list of concurrent client counts")
    p.add_argument("--seconds", type=float, default=8, help="measured time per client count")
    p.add_argument("--warmup", type=float, default=2, help="unmeasured load before each count")
    p.add_argument("--batch", type=int, default=16, help="offline batch = FACEID_BATCH_MAX_SIZE")
    p.add_argument("--compile", default="off", help="FACEID_COMPILE (off, freeze); a comma list measures "
                   "each, offline and through a server, in the same run")
    p.add_argument("--batch_wait_ms", default="5", help="FACEID_BATCH_WAIT_MS of the server; a comma list "
                   "(e.g. 0,2) measures one server per value in the same run")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load generator: raw = lean HTTP/1.1 keep-alive connections (about 0.1 ms of CPU per "
                   "request here); httpx = httpx.AsyncClient (about 3 ms per request, taken from the server's cores)")
    p.add_argument("--server_batch", default="", help="FACEID_BATCH_MAX_SIZE of the server (default: --batch); a "
                   "comma list measures one server per value against the same offline batched rate")
    p.add_argument("--omp", default="", help=f"comma list of OpenMP wait settings ({', '.join(OMP_POLICIES)}) "
                   "measured side by side, offline rows (in a child process each) and server alike; "
                   "default: this process PASSIVE, the server its own default")
    p.add_argument("--rounds", type=int, default=3,
                   help="after the rows above, this many rounds of (a fresh process's offline rows, a fresh "
                   "server with 1 client and with the most clients), alternating: a process's forward pass "
                   "speed varies between processes here, so issue 6's goals are judged on the medians; 0: none")
    p.add_argument("--infer_workers", default="0", help="FACEID_INFER_WORKERS of the server (0: it decides, "
                   "app.serving.inference_plan); a comma list measures one server per value")
    p.add_argument("--offline_json", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offline_workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from app.serving import inference_plan

    # The offline reference is the faster of one pass at a time on all threads and as many passes
    # at once as the server's most workers, so a server with workers is held to that rate too.
    plans = {int(w): inference_plan(int(w), args.device)[0] for w in args.infer_workers.split(",")}
    if not args.offline_workers:
        args.offline_workers = max(plans.values())

    jpeg = sample_images(1)[0]
    if args.offline_json:  # a child: the offline rows in a fresh process (its own OpenMP setting)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            print(json.dumps(pool.submit(offline, Path(args.checkpoint), args.device, args.batch, args.seconds,
                                         jpeg[1], args.compile, args.offline_workers).result()))
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
                offs[(mode, pol)] = pool.submit(offline, ckpt, args.device, args.batch, args.seconds, jpeg[1],
                                                mode, args.offline_workers).result()
        o = offs[(mode, pol)]
        print(f"offline, compile {mode}{', ' + pol if pol else ''}: {o['batched_1']:.1f} img/s batched, "
              f"{o['batched_w']:.1f} img/s with {o['workers']} passes at once, {1000 * o['single']:.1f} ms single",
              flush=True)
    rows = []
    waits = [float(w) for w in args.batch_wait_ms.split(",")]
    bmaxes = [int(b) for b in (args.server_batch or str(args.batch)).split(",")]
    for mode, pol, wait, bmax, iw in [(m, p_, w, b, i) for m, p_ in keys for w in waits for b in bmaxes
                                      for i in plans]:
        env = {"FACEID_BATCH_MAX_SIZE": str(bmax), "FACEID_BATCH_WAIT_MS": str(wait),
               "FACEID_COMPILE": mode, "FACEID_INFER_WORKERS": str(iw), **OMP_POLICIES.get(pol, {})}
        # Without a setting of the user's (or --omp), the server applies its own default (app.main).
        unset = OMP_VARS if pol or USER_OMP_WAIT_POLICY is None else ()
        with Server(ckpt, device=args.device, env=env, unset=unset) as server:
            for n in [int(x) for x in args.clients.split(",")]:
                rows.append({**asyncio.run(server_rate(server, n, args.seconds, args.warmup, jpeg, args.client)),
                             "wait": wait, "bmax": bmax, "compile": mode, "omp": pol, "workers": plans[iw]})
                print(f"server, compile {mode}{', ' + pol if pol else ''}, wait {wait:g} ms, max batch {bmax}, "
                      f"workers {plans[iw]}, {n} clients: "
                      f"{rows[-1]['rate']:.1f} img/s", flush=True)
    rounds = []
    most = max(int(x) for x in args.clients.split(","))
    if args.rounds > 0:
        mode, pol = keys[0]
        iw = next(iter(plans))
        env = {"FACEID_BATCH_MAX_SIZE": str(bmaxes[0]), "FACEID_BATCH_WAIT_MS": str(waits[0]),
               "FACEID_COMPILE": mode, "FACEID_INFER_WORKERS": str(iw), **OMP_POLICIES.get(pol, {})}
        unset = OMP_VARS if pol or USER_OMP_WAIT_POLICY is None else ()
        for k in range(args.rounds):
            o = offline_in_child(pol, ckpt, args, mode)
            with Server(ckpt, device=args.device, env=env, unset=unset) as server:
                one = asyncio.run(server_rate(server, 1, args.seconds, args.warmup, jpeg, args.client))
                many = asyncio.run(server_rate(server, most, args.seconds, args.warmup, jpeg, args.client))
            rounds.append({"single": o["single"], "batched": o["batched"], **one, "rate_most": many["rate"],
                           "mean_batch_most": many["mean_batch"]})
            print(f"round {k + 1}: offline {o['batched']:.1f} img/s batched, single forward {1000 * o['single']:.1f} ms "
                  f"(fresh process); {most} clients {many['rate']:.1f} img/s, 1 client p50 {1000 * one['p50']:.1f} ms "
                  f"(fresh server)", flush=True)
    load_after = loadavg()
    off = offs[keys[0]]

    print()
    omp_note = (f"OpenMP wait per row (offline rows and server alike): {', '.join(policies)}" if policies else
                f"server OMP_WAIT_POLICY {USER_OMP_WAIT_POLICY or 'not set (the server defaults to PASSIVE)'}")
    print(f"serve throughput: checkpoint {ckpt} ({off['img_size']} px), device {args.device}, "
          f"torch threads {off['threads']}, batch {args.batch}, {omp_note}; "
          f"{args.seconds:g} s per row after {args.warmup:g} s warm-up")
    print(f"machine: {machine()}; load average before {load_before}, after {load_after}")
    print("shares are of the offline batched rate of the same compile mode and OpenMP setting: the faster of "
          "one pass of the whole batch at a time on all threads and as many passes at once as the server's "
          "most workers, each on a share of the batch and of the threads")
    print()
    print("| compile | omp | | images/s | share of offline batched | p50 ms | p99 ms | requests | errors | "
          "images per forward pass |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (mode, pol), o in offs.items():
        pol = pol or "-"
        best = o["batched"]
        print(f"| {mode} | {pol} | offline batched ({args.batch}), one pass at a time | {o['batched_1']:.1f} | "
              f"{100 * o['batched_1'] / best:.0f} % | - | - | - | - | {args.batch} |")
        if o["batched_w"] == o["batched_w"]:
            print(f"| {mode} | {pol} | offline, {o['workers']} passes of {args.batch // o['workers']} at once | "
                  f"{o['batched_w']:.1f} | {100 * o['batched_w'] / best:.0f} % | - | - | - | - | "
                  f"{args.batch // o['workers']} |")
        print(f"| {mode} | {pol} | offline single forward | {1 / o['single']:.1f} | "
              f"{100 / o['single'] / o['batched']:.0f} % | {1000 * o['single']:.1f} | - | - | - | 1 |")
    for r in rows:
        o = offs[(r["compile"], r["omp"])]
        print(f"| {r['compile']} | {r['omp'] or '-'} | server, wait {r['wait']:g} ms, max {r['bmax']}, workers {r['workers']}, {r['clients']} client"
              f"{'s' if r['clients'] > 1 else ''} | {r['rate']:.1f} | {100 * r['rate'] / o['batched']:.0f} % | "
              f"{1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} | {r['n']} | {r['errors']} | {r['mean_batch']:.1f} |")
    print()
    print("CPU milliseconds per request, over the measured seconds of each row: the server's forward-pass "
          "thread and its OpenMP threads; the rest of the server (event loop: HTTP and multipart parsing, "
          "answering; decoding threads); this process's clients; cores left idle (from /proc, 10 ms ticks)")
    print()
    print("| compile | omp | server | forward | server, rest | clients | idle | offline batched forward |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        o = offs[(r["compile"], r["omp"])]
        print(f"| {r['compile']} | {r['omp'] or '-'} | wait {r['wait']:g} ms, max {r['bmax']}, workers {r['workers']}, {r['clients']} client"
              f"{'s' if r['clients'] > 1 else ''} | {r['cpu_forward']:.1f} | {r['cpu_server_rest']:.1f} | "
              f"{r['cpu_client']:.1f} | {r['cpu_idle']:.1f} | {1000 * o['threads'] / o['batched']:.1f} |")
    if any(r.get("timing") for r in rows):
        print()
        print("Where a request's time went, median ms per request (the server's Server-Timing header: reading "
              "the upload, decoding, queueing for the worker, the forward pass of the batch it joined, the "
              "hand-back to the event loop, the handler's total; outside = the client's latency minus that "
              "total: HTTP in uvicorn and the client, middleware, the JSON answer)")
        print()
        print("| compile | omp | server | " + " | ".join(TIMING_PARTS) + " |")
        print("|---|---|---|" + "---:|" * len(TIMING_PARTS))
        for r in rows:
            t = r.get("timing") or {}
            print(f"| {r['compile']} | {r['omp'] or '-'} | wait {r['wait']:g} ms, max {r['bmax']}, workers {r['workers']}, {r['clients']} client"
                  f"{'s' if r['clients'] > 1 else ''} | " + " | ".join(f"{t[k]:.2f}" if k in t else "-" for k in TIMING_PARTS) + " |")
    if rounds:
        mode, pol = keys[0]
        print()
        print(f"Issue 6's goals over {len(rounds)} rounds of a fresh process's offline rows then a fresh server "
              f"with 1 and {most} clients (compile {mode}{', ' + pol if pol else ''}, wait {waits[0]:g} ms, max "
              f"{bmaxes[0]}, workers {plans[next(iter(plans))]}); offline batched = the faster of one pass at a time "
              "and passes at once; server forward = the Server-Timing forward part, service = each request's latency "
              "minus its forward pass (median)")
        print()
        print(f"| round | offline batched img/s | {most} clients img/s | share | offline single forward ms | "
              "1 client p50 ms | p99 ms | server forward ms | service ms | p50 / offline forward |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in enumerate(rounds, 1):
            print(f"| {k} | {r['batched']:.1f} | {r['rate_most']:.1f} | {100 * r['rate_most'] / r['batched']:.0f} % | "
                  f"{1000 * r['single']:.1f} | {1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} | "
                  f"{r['timing'].get('forward', float('nan')):.1f} | {r['service']:.2f} | "
                  f"{r['p50'] / r['single']:.2f}x |")

        def med(key: str) -> float:
            return statistics.median(r[key] for r in rounds)

        print()
        print(f"rounds: {most} clients {med('rate_most'):.1f} img/s vs offline batched {med('batched'):.1f} img/s "
              f"(medians) = {100 * med('rate_most') / med('batched'):.0f} % (goal: at least 80 %); single-client "
              f"p50 {1000 * med('p50'):.1f} ms vs offline forward pass {1000 * med('single'):.1f} ms = "
              f"{med('p50') / med('single'):.2f}x (goal: at most 1.10x); the service itself adds "
              f"{med('service'):.2f} ms per request = {med('service') / (1000 * med('single')):.1%} of a forward "
              f"pass; between processes the offline batched rate ranged {min(r['batched'] for r in rounds):.1f} to "
              f"{max(r['batched'] for r in rounds):.1f} img/s and the single forward "
              f"{1000 * min(r['single'] for r in rounds):.1f} to {1000 * max(r['single'] for r in rounds):.1f} ms")
    print()
    best_single = min(o["single"] for o in offs.values())
    for i, r in enumerate(rows):
        o = offs[(r["compile"], r["omp"])]
        what = (f"compile {r['compile']}{', ' + r['omp'] if r['omp'] else ''}, wait {r['wait']:g} ms, "
                f"max batch {r['bmax']}, workers {r['workers']} (run {i})")
        if r["clients"] == 1:
            print(f"{what}: single client p50 {1000 * r['p50']:.1f} ms vs one forward pass {1000 * o['single']:.1f} ms "
                  f"= {r['p50'] / o['single']:.2f}x (vs the fastest offline forward here, {1000 * best_single:.1f} ms: "
                  f"{r['p50'] / best_single:.2f}x; decode + resize of the JPEG alone: {1000 * o['decode']:.1f} ms)")
        if r["clients"] == max(x["clients"] for x in rows):
            print(f"{what}: {r['clients']} clients = {100 * r['rate'] / o['batched']:.0f} % of the offline batched rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
