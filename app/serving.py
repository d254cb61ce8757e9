"""The served model: which checkpoint answers /embed and /verify, and the thread that runs it.

- A switch is atomic: the new Verifier is built completely, then one reference is replaced. A
  request holds the `ServedModel` it started with, so requests in flight finish on the old model.
- Forward passes run on inference worker threads, off the event loop, so `/health` stays quick
  under load: on a CPU with two or more cores two passes at once by default (FACEID_INFER_WORKERS),
  each on half the cores, the second taking work only while the first is busy (and the first
  taking only an even share of the requests in flight while the second is free); on a GPU one
  (`inference_plan`). Requests that arrive while the workers are busy are embedded together in
  the next batch (up to FACEID_BATCH_MAX_SIZE images). Under concurrent load a worker also waits
  for requests still on their way, as long as each arrives within FACEID_BATCH_WAIT_MS (5) of the
  one before and fewer are in than the clients its own last batch answered plus those that
  queued while it ran: with clients sending back to back, no wait splits the load into small
  batches, and expecting only the last batch's count lets them settle into alternating half
  batches; a lone request never waits.
- Each upload is decoded and resized to the model's input size on a decoding thread as it arrives
  (`Verifier.prepare`), so a batch's forward pass only stacks its images; GET /model reports how
  requests were batched.
- The choice survives a restart: the served checkpoint is remembered in the job database.

torch is imported only here, lazily, through faceid.inference: routes never import it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import anyio

from faceid.errors import CheckpointError, FaceIDError, ImageError, ModelNotReadyError

from app.store import JobStateError, JobStore
from app.paths import usable_cpus
from app.settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = "served_model"
# What a request needing a model is told before there is one (the 503s of /embed, /verify, /ready, /model)
NO_MODEL = ("no model is loaded yet: train one with POST /jobs (it is served when the job succeeds), serve a "
            "finished job with POST /models/{job_id}/activate, or start the server with "
            "FACEID_CHECKPOINT=path/to/backbone_best.pt")
ENV_STATE_KEY = "env_checkpoint_applied"

# (checkpoint path, device) -> an object with embed(images), compare(e1, e2, threshold),
# resolve_threshold(threshold) and info, as faceid.inference.Verifier (docs/CONTRACTS.md, 3).
VerifierLoader = Callable[[Path, str], Any]


def inference_plan(requested: int, device: str) -> tuple[int, int]:
    """(forward passes run at once, torch compute threads for each) for FACEID_INFER_WORKERS =
    `requested` (0: decide) on FACEID_DEVICE = `device`. By default two on a CPU with two or more
    cores, each on half of them; a GPU runs one at a time. On a CPU one worker on all threads
    leaves a core idle while the event loop answers a batch and parses the next; two workers keep
    both busy, and with the second taking work only while the first is busy, a lone request is
    answered as fast as with one worker."""
    cores = usable_cpus()
    if device.startswith("cuda"):
        on_gpu = True
    elif device == "auto":
        import torch

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = False
    workers = 1 if on_gpu else (requested or (2 if cores >= 2 else 1))
    return workers, max(1, cores // workers)


def load_verifier(path: Path, device: str, *, compile: str = "off", max_batch: int = 16,
                  workers: int = 1, threads: int = 0) -> Any:
    """The production loader. With compile="freeze" every batch size the worker can form is
    compiled here, before the model is swapped in, so no request waits for a compilation. With
    `workers` > 1 on a CPU, torch gets `threads` compute threads and the Verifier lets the workers'
    forward passes run at once (uncompiled only: a compiled model keeps them one at a time)."""
    from faceid.inference import Verifier

    verifier = Verifier.from_checkpoint(path, device=device, compile=compile)
    if workers > 1 and verifier.device.type == "cpu" and compile == "off":
        import torch

        if threads:
            torch.set_num_threads(threads)
        verifier.concurrent = True
    if compile != "off":
        t = time.monotonic()
        try:
            n = verifier.warmup(max_batch)
        except Exception as e:  # no C++ compiler, an unsupported device, ...
            raise CheckpointError(f"FACEID_COMPILE={compile} failed for {path} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}); set FACEID_COMPILE=off "
                                  "to serve it uncompiled") from None
        log.info("compiled %s for %d batch sizes in %.0f s", path, n, time.monotonic() - t)
    return verifier


def open_upload(data: bytes, *, max_pixels: int, name: str, reduce_to: Optional[int] = None) -> Any:
    from faceid.images import open_image

    return open_image(bytes(data), max_pixels=max_pixels, name=name, reduce_to=reduce_to)


@dataclass(frozen=True)
class ServedModel:
    id: str                     # the job id, or "checkpoint-<hash>" for a file given at start
    job_id: Optional[str]
    checkpoint: str
    source: str                 # "job" (newest succeeded job), "activated", "env" (FACEID_CHECKPOINT)
    pinned: bool
    loaded_at: float
    verifier: Any

    def describe(self) -> dict[str, Any]:
        info = dict(self.verifier.info)
        return {"id": self.id, "job_id": self.job_id, "checkpoint": self.checkpoint, "source": self.source,
                "pinned": self.pinned, "loaded_at": self.loaded_at,
                "epoch": info.get("epoch"), "metrics": info.get("metrics") or {},
                "thresholds": info.get("thresholds") or {}, "img_size": info.get("img_size"),
                "crop": info.get("crop"), "embedding_size": info.get("embedding_size"), "arch": info.get("arch"),
                "train_mode": info.get("train_mode"), "faces": info.get("faces")}


def _checkpoint_id(path: Path) -> str:
    return "checkpoint-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


class _Work:
    __slots__ = ("verifier", "images", "future", "queued", "started", "finished", "batch_images")

    def __init__(self, verifier: Any, images: Sequence[Any]) -> None:
        self.verifier = verifier
        self.images = list(images)
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        # time.perf_counter() when queued, and when its batch's forward pass started and ended
        self.queued, self.started, self.finished = time.perf_counter(), 0.0, 0.0
        self.batch_images = 0


class EmbedWorker:
    """`workers` threads (default one) that run every forward pass, batching requests that wait.

    Requests queued while a forward pass runs share the next one. Under concurrent load (the last
    batch held several requests, others queued while it ran, or more are queued already) the
    worker also waits for requests still on their way: up to `wait_ms` for the next one, renewed
    by each arrival, until the clients its own last batch answered and those whose requests
    queued while it ran are in (at most `wait_ms` per image of a full batch in all); a lone
    request (one client) never waits.

    With several workers, a worker takes at most an even share of the images the clients keep in
    flight while a later worker is free (16 clients, two workers: 8 each; 4 clients: 2 each), so
    the rest go to that worker the moment this one starts its forward pass. Without the share one
    worker could take all 16 (or all 4) every time while the other core idled."""

    def __init__(self, max_batch: int = 16, wait_ms: float = 5.0, workers: int = 1) -> None:
        self.max_batch = max(1, max_batch)
        self.wait_s = max(0.0, wait_ms) / 1000.0
        self.workers = max(1, workers)
        # Per worker: requests in its last batch, and those that queued while that batch ran (either
        # above 1 and 0 means concurrent load).
        self._last_requests = [0] * self.workers
        self._queued_during_last = [0] * self.workers
        self._batches = self._requests = self._images = 0  # since start
        # Images submitted and not yet answered, their peak since worker 0 last started a batch,
        # and that peak over its last full cycle: how many images the clients keep in flight.
        self._in_flight = self._peak = self._load = 0
        self._count = threading.Lock()  # for the counts above
        self._queue: queue.Queue[Optional[_Work]] = queue.Queue()
        # Worker i > 0 takes work only while workers 0..i-1 are all in a forward pass, so a lone
        # request always lands on worker 0 (alternating threads cost it its warm caches).
        self._busy = [False] * self.workers
        self._busy_changed = threading.Condition()
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, args=(i,), name="faceid-embed", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    async def embed(self, verifier: Any, images: Sequence[Any], timing: Optional["Timing"] = None) -> Any:
        """float32 [N, D] unit-norm embeddings of `images`, computed on the worker thread. With
        `timing`, how long the request queued, its batch's forward pass took, and the hand-back to
        the event loop are added to it."""
        work = _Work(verifier, images)
        self._submit(work)
        result = await asyncio.wrap_future(work.future)
        if timing is not None and work.finished:
            timing.add("queue", work.started - work.queued)
            timing.add("forward", work.finished - work.started, f"batch of {work.batch_images}")
            timing.add("handback", time.perf_counter() - work.finished)
        return result

    def stats(self) -> dict[str, Any]:
        """The settings and what the worker has run since the server started (GET /model)."""
        with self._count:
            b, r, n = self._batches, self._requests, self._images
        return {"max_batch_size": self.max_batch, "wait_ms": self.wait_s * 1000.0, "workers": self.workers, "batches": b,
                "requests": r, "images": n, "mean_batch_images": round(n / b, 2) if b else None}

    def close(self) -> None:
        with self._busy_changed:
            self._closing = True
            self._busy_changed.notify_all()
        for _ in self._threads:  # each worker ends at the first None it takes
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)

    def _submit(self, work: _Work) -> None:
        if self.workers == 1:  # no share to size: nothing to count
            self._queue.put(work)
            return
        with self._count:
            self._in_flight += len(work.images)
            self._peak = max(self._peak, self._in_flight)
        work.future.add_done_callback(functools.partial(self._answered, len(work.images)))
        with self._busy_changed:  # a helper waiting for work sees the put or is told of it
            self._queue.put(work)
            if self._busy[0]:  # every helper needs worker 0 busy; otherwise worker 0 takes it
                self._busy_changed.notify_all()

    def _next(self, index: int) -> Optional[_Work]:
        """The next request for worker `index`: worker 0 waits for one; another worker only takes
        what queues while every worker before it is busy. The later workers sleep until a request
        is queued while those workers are busy: no polling, which would cost CPU and wake-ups
        beside every lone request's forward pass."""
        if index == 0:
            return self._queue.get()
        while True:
            with self._busy_changed:
                while not self._closing and not (all(self._busy[:index]) and self._queue.qsize()):
                    self._busy_changed.wait()
                if self._closing:
                    return self._queue.get()
                try:
                    return self._queue.get_nowait()
                except queue.Empty:  # worker 0 took it first
                    continue

    def _answered(self, images: int, _future: Any) -> None:
        with self._count:  # answered, failed or cancelled
            self._in_flight -= images

    def _share(self, index: int) -> int:
        """The most images worker `index` takes while a later worker is free: an even share of
        what the clients keep in flight (16 clients, two workers: 8 each), else a full batch."""
        if self.workers == 1 or all(self._busy[index + 1:]):
            return self.max_batch
        with self._count:
            load = max(self._load, self._in_flight)
        return max(1, min(self.max_batch, -(-load // self.workers)))

    def _set_busy(self, index: int, busy: bool) -> None:
        if self.workers > 1:
            with self._busy_changed:
                self._busy[index] = busy
                # Becoming busy can let a helper take what is queued; becoming idle never does.
                if busy and self._queue.qsize():
                    self._busy_changed.notify_all()

    def _loop(self, index: int = 0) -> None:
        _name_os_thread("faceid-embed")
        carry: Optional[_Work] = None
        while True:
            first = carry if carry is not None else self._next(index)
            carry = None
            if first is None:
                return
            if index == 0 and self.workers > 1:
                with self._count:  # the load over worker 0's last cycle: collect, run, answer
                    self._load, self._peak = self._peak, self._in_flight
            batch = [first] if first.future.set_running_or_notify_cancel() else []
            size = len(first.images) if batch else 0
            # Concurrent load: the last batch held several requests, others queued while it ran (two
            # clients out of step: without this, one worker ran each of their requests alone, for
            # ever), or more are queued now.
            concurrent = (self._last_requests[index] > 1 or self._queued_during_last[index] > 0
                          or not self._queue.empty())
            # Under concurrent load, wait while requests keep coming: each arrival allows another
            # wait_s for the next (clients answered by the last batch send their next requests one
            # after another, as fast as the event loop parses them), and the whole wait is at most
            # one wait_s per image of a full batch. Expected are the clients the last batch answered
            # plus those whose requests queued while it ran; once that many are in, it takes only
            # what is already queued. (Expecting only the last batch's count lets 16 clients settle
            # into two alternating half batches of about 8 images per forward pass.)
            expected = self._last_requests[index] + self._queued_during_last[index]
            start = time.monotonic()
            deadline = start + (self.wait_s if concurrent else 0.0)
            cap = start + self.wait_s * self.max_batch
            stop = False
            while size < self._share(index):  # the rest wait for a free later worker
                timeout = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if not batch:
                    if nxt.future.set_running_or_notify_cancel():
                        batch, size = [nxt], len(nxt.images)
                    continue
                if nxt.verifier is not batch[0].verifier or size + len(nxt.images) > self.max_batch:
                    carry = nxt  # a different model, or no room: it starts the next batch
                    break
                if nxt.future.set_running_or_notify_cancel():
                    batch.append(nxt)
                    size += len(nxt.images)
                    if concurrent:
                        deadline = 0.0 if len(batch) >= expected else min(cap, time.monotonic() + self.wait_s)
            if batch:
                self._last_requests[index] = len(batch)
                with self._count:  # counted before the answers go out, so a client sees its batch
                    self._batches += 1
                    self._requests += len(batch)
                    self._images += size
                self._set_busy(index, True)
                try:
                    outcome = self._forward(batch)
                finally:
                    self._set_busy(index, False)
                self._queued_during_last[index] = self._queue.qsize() + (carry is not None)
                # Answered only now that this worker is free again: a client's next request then
                # comes back to it, not to a helper (which takes work only while this one is busy).
                self._deliver(batch, *outcome)
            if stop:
                return

    @staticmethod
    def _forward(batch: list[_Work]) -> tuple[Any, Optional[BaseException]]:
        """(embeddings of every image in the batch, None), or (None, the exception)."""
        images = [im for work in batch for im in work.images]
        started = time.perf_counter()
        try:
            embeddings = batch[0].verifier.embed(images)
        except BaseException as e:  # handed to every waiting request
            return None, e
        finished = time.perf_counter()
        for work in batch:
            work.started, work.finished, work.batch_images = started, finished, len(images)
        return embeddings, None

    @staticmethod
    def _deliver(batch: list[_Work], embeddings: Any, error: Optional[BaseException]) -> None:
        start = 0
        for work in batch:
            if error is not None:
                work.future.set_exception(error)
            else:
                work.future.set_result(embeddings[start:start + len(work.images)])
                start += len(work.images)


class Timing:
    """Where one request's time went, for its `Server-Timing` response header (milliseconds,
    browsers' developer tools and `curl -v` show it): reading the upload, decoding, waiting for
    the worker, the forward pass of the batch it joined, and the hand-back to the event loop."""

    __slots__ = ("start", "parts")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.parts: list[tuple[str, float, str]] = []

    def add(self, name: str, seconds: float, desc: str = "") -> None:
        self.parts.append((name, seconds, desc))

    def since(self, name: str, t0: float) -> float:
        """Add the time from `t0` to now as `name`; returns now."""
        now = time.perf_counter()
        self.add(name, now - t0)
        return now

    def header(self) -> str:
        parts = [f'{n};dur={1000 * s:.2f}' + (f';desc="{d}"' if d else "") for n, s, d in self.parts]
        return ", ".join(parts + [f"total;dur={1000 * (time.perf_counter() - self.start):.2f}"])


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the operating system too (Linux: `top -H`, `ps -L`,
    /proc/PID/task/*/comm), so the forward pass's CPU time can be told from HTTP's. OpenMP threads
    that torch starts from this thread inherit the name. Elsewhere, or if it fails, nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - not Linux, or no prctl: the name is only a convenience
        pass


class ModelManager:
    """Owns the served model: chooses it at start, switches it, and runs inference."""

    def __init__(self, settings: Settings, store: JobStore, loader: Optional[VerifierLoader] = None) -> None:
        self.settings = settings
        self.store = store
        workers, threads = inference_plan(settings.infer_workers, settings.device)
        self.loader = loader or functools.partial(load_verifier, compile=settings.compile,
                                                  max_batch=settings.batch_max_size, workers=workers,
                                                  threads=threads)
        # Whether a checkpoint could be served, without serving it (a job that succeeds while a
        # model is pinned): built as the loader builds it, but never compiled
        self.checker = loader or load_verifier
        self._current: Optional[ServedModel] = None
        self._followed: Optional[tuple] = None  # (checkpoint, loaded_at) follow() last acted on
        self._switch = threading.Lock()  # one load at a time; readers never wait for it
        self.last_error: Optional[str] = None
        self._worker = EmbedWorker(settings.batch_max_size, settings.batch_wait_ms, workers)
        # Decoding is CPU work too; bound how many images are decoded at once (and held in memory):
        # one per core, at least two (Pillow decodes without the GIL, so a many-core host feeding
        # a GPU decodes phone photos in parallel; bench/README.md, decode_speed, has the times).
        self._decode_limiter = anyio.CapacityLimiter(max(2, usable_cpus()))

    # -- which model ------------------------------------------------------------------------

    @property
    def current(self) -> Optional[ServedModel]:
        return self._current

    def require(self) -> ServedModel:
        model = self._current
        if model is None:
            hint = NO_MODEL
            if self.last_error:
                hint += f" (the last load failed: {self.last_error})"
            raise ModelNotReadyError(hint)
        return model

    def load(self, path: Path, *, job_id: Optional[str], source: str, pinned: bool,
             unless_pinned: bool = False, remember: bool = True) -> Optional[ServedModel]:
        """Build the Verifier for `path`, then make it the served model. Raises CheckpointError
        (the current model stays). With `unless_pinned`, a pinned model is kept (returns None).
        With `remember`, the job database records it (a replica, which follows it, does not)."""
        with self._switch:
            if unless_pinned and self._current is not None and self._current.pinned:
                # Not served, but checked: a job must not be `succeeded` with a model that cannot be
                try:
                    self.checker(Path(path), self.settings.device)
                except FaceIDError:
                    raise
                except Exception as e:  # out of memory on the device, a loader bug
                    raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {str(e)[:200]}") from None
                log.info("keeping the pinned model %s; %s is not served", self._current.id, path)
                return None
            try:
                verifier = self.loader(Path(path), self.settings.device)
            except FaceIDError as e:
                self.last_error = str(e)
                raise
            except Exception as e:  # out of memory on the device, a loader bug: still not servable
                log.exception("loading %s failed", path)
                self.last_error = f"cannot load {path}: {type(e).__name__}: {str(e)[:200]}"
                raise CheckpointError(self.last_error) from None
            served = ServedModel(id=job_id or _checkpoint_id(Path(path)), job_id=job_id,
                                 checkpoint=str(path), source=source, pinned=pinned,
                                 loaded_at=time.time(), verifier=verifier)
            self._current = served  # the switch: one reference assignment
            self.last_error = None
            if remember:  # loaded_at: a replica reloads a checkpoint rewritten in place (a resumed job)
                self.store.set_state(STATE_KEY, {"checkpoint": str(path), "job_id": job_id, "source": source,
                                                 "pinned": pinned, "loaded_at": served.loaded_at})
        log.info("serving %s (%s)", served.id, path)
        return served

    def start(self) -> None:
        """At server start: FACEID_CHECKPOINT when it changed since it was last applied, else the
        model served before the restart, else the newest succeeded job's checkpoint."""
        env = self.settings.checkpoint
        if env is not None:
            env_path = env.expanduser().absolute()
            if self.store.get_state(ENV_STATE_KEY) != str(env_path) or self.store.get_state(STATE_KEY) is None:
                try:
                    self.load(env_path, job_id=None, source="env", pinned=False)
                    self.store.set_state(ENV_STATE_KEY, str(env_path))
                except FaceIDError as e:
                    # The operator asked for this model: none rather than the previous one, so that
                    # /ready says why (tried again at the next start)
                    log.error("FACEID_CHECKPOINT %s cannot be served: %s", env_path, e)
                    self.last_error = f"FACEID_CHECKPOINT {env_path} cannot be served: {e}"
                    self.store.set_state(STATE_KEY, None)  # nor by the replicas, which follow this record
                return
        remembered = self.store.get_state(STATE_KEY)
        if remembered:
            try:
                self.load(Path(remembered["checkpoint"]), job_id=remembered.get("job_id"),
                          source=remembered.get("source", "job"), pinned=bool(remembered.get("pinned")))
                return
            except FaceIDError as e:
                log.error("the model served before the restart cannot be loaded: %s", e)
        jobs, _ = self.store.list(status="succeeded", limit=50)
        for job in jobs:  # newest first, until one loads
            if not job.get("checkpoint"):
                continue
            try:
                self.load(Path(job["checkpoint"]), job_id=job["id"], source="job", pinned=False)
                return
            except FaceIDError as e:
                log.error("job %s's checkpoint cannot be served: %s; trying the job before it", job["id"], e)

    def follow(self) -> bool:
        """An inference replica's step (app/replicas.py): serve the model the job database says the
        main server serves, loading it again whenever the main server did (the file may have been
        rewritten). True when it switched; a checkpoint that fails to load is logged once and tried
        again only when the main server loads a model again."""
        state = self.store.get_state(STATE_KEY)
        if not state:
            return False
        key = (state.get("checkpoint"), state.get("loaded_at"))
        if key == self._followed:
            return False
        self._followed = key
        try:
            self.load(Path(state["checkpoint"]), job_id=state.get("job_id"), source=state.get("source", "job"),
                      pinned=bool(state.get("pinned")), remember=False)
        except FaceIDError as e:
            log.error("the main server's model %s cannot be served here: %s", state["checkpoint"], e)
            return False
        return True

    def on_job_succeeded(self, job: dict[str, Any]) -> None:
        """Called by the runner: serve the new job's best checkpoint unless a model is pinned."""
        self.load(Path(job["checkpoint"]), job_id=job["id"], source="job", pinned=False, unless_pinned=True)

    def activate(self, job_id: str, pin: bool = True) -> ServedModel:
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job["status"] != "succeeded" or not job.get("checkpoint"):
            raise JobStateError(f"job {job_id} is {job['status']}; only a succeeded job has a model to serve")
        try:
            served = self.load(Path(job["checkpoint"]), job_id=job_id, source="activated", pinned=pin)
            assert served is not None
            return served
        except CheckpointError as e:
            raise CheckpointError(f"job {job_id}'s checkpoint cannot be served ({e}); the current model "
                                  "stays") from None

    # -- inference ---------------------------------------------------------------------------

    async def decode(self, data: bytes, name: str, model: ServedModel, detect: bool = True) -> Any:
        """The upload as the image `model` embeds, decoded off the event loop and prepared for it
        there (its `prepare_face`, when it has one: the face found and aligned, or the image
        resized to its input size), so the worker's batch only stacks and runs the network. An
        upload that is not an image, or that shows no face an aligned model can use, is an
        ImageError naming the form field."""
        prepare_face = getattr(model.verifier, "prepare_face", None)
        prepare = getattr(model.verifier, "prepare", None)
        side = getattr(model.verifier, "decode_side", None)  # large JPEGs as its training decoded them

        def work() -> Any:
            try:
                img = open_upload(data, max_pixels=self.settings.max_pixels, name=name, reduce_to=side)
                if prepare_face is not None:
                    return prepare_face(img, detect)
            except ImageError as e:
                e.field = name  # the answer's "field", as for the other refused fields
                raise
            return prepare(img) if prepare is not None else img

        return await anyio.to_thread.run_sync(work, limiter=self._decode_limiter)

    async def embed(self, model: ServedModel, images: Sequence[Any], timing: Optional[Timing] = None) -> Any:
        return await self._worker.embed(model.verifier, images, timing)

    def batching(self) -> dict[str, Any]:
        return self._worker.stats()

    def close(self) -> None:
        self._worker.close()
