"""The batching worker: the threads that run every forward pass, off the event loop, embedding the
requests that wait together in one batch (docs/SERVICE.md, "Batching" and "Inference workers").

- Requests that arrive while the workers are busy are embedded together in the next batch (up to
  FACEID_BATCH_MAX_SIZE images). Under concurrent load a worker also waits for requests still on
  their way, as long as each arrives within FACEID_BATCH_WAIT_MS of the one before and fewer are in
  than the clients its own last batch answered plus those that queued while it ran; a lone request
  never waits.
- With several workers (FACEID_INFER_WORKERS, on a CPU) the second takes work only while the first
  is busy, and the first takes only an even share of the requests in flight while the second is
  free.
- A model trained on aligned faces finds the faces of all the photos in a batch with one detector
  call before the forward pass, on the model's device (`Verifier.prepare_pending`); a photo without
  a face fails only its own request.
- `Timing` says where one request's time went (its Server-Timing header).

How these rules came about and how they batch real clients: bench/README.md, serve_throughput.
The forward pass is the verifier's own: nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import queue
import threading
import time
from typing import Any, Optional, Sequence


class _Work:
    __slots__ = ("verifier", "images", "future", "queued", "started", "detected", "finished", "batch_images", "error")

    def __init__(self, verifier: Any, images: Sequence[Any]) -> None:
        self.verifier = verifier
        self.images = list(images)
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        # time.perf_counter() when queued, when its batch's work started, when the batch's faces
        # were found (as `started` when there was nothing to detect) and when the forward pass ended
        self.queued, self.started, self.detected, self.finished = time.perf_counter(), 0.0, 0.0, 0.0
        self.batch_images = 0
        self.error: Optional[BaseException] = None  # this request's own failure (no face found)


class EmbedWorker:
    """`workers` threads (default one) that run every forward pass, batching requests that wait.

    Requests queued while a forward pass runs share the next one. Under concurrent load (the last
    batch held several requests, others queued while it ran, or more are queued already) the
    worker also waits for requests still on their way: up to `wait_ms` for the next one, renewed
    by each arrival, until the clients its own last batch answered and those whose requests
    queued while it ran are in (at most `wait_ms` per image of a full batch in all); a lone
    request (one client) never waits.

    With several workers, a worker takes at most an even share of the images the clients keep in
    flight while a later worker is free, so the rest go to that worker the moment this one starts
    its forward pass (why: bench/README.md, serve_throughput)."""

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
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name="faceid-embed", daemon=True)
            for i in range(self.workers)
        ]
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
            if work.detected > work.started:
                timing.add("detect", work.detected - work.started)
            timing.add("forward", work.finished - work.detected, f"batch of {work.batch_images}")
            timing.add("handback", time.perf_counter() - work.finished)
        return result

    def stats(self) -> dict[str, Any]:
        """The settings and what the worker has run since the server started (GET /model)."""
        with self._count:
            b, r, n = self._batches, self._requests, self._images
        return {
            "max_batch_size": self.max_batch,
            "wait_ms": self.wait_s * 1000.0,
            "workers": self.workers,
            "batches": b,
            "requests": r,
            "images": n,
            "mean_batch_images": round(n / b, 2) if b else None,
        }

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
        what the clients keep in flight, else a full batch."""
        if self.workers == 1 or all(self._busy[index + 1 :]):
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
            # clients out of step), or more are queued now.
            concurrent = (
                self._last_requests[index] > 1 or self._queued_during_last[index] > 0 or not self._queue.empty()
            )
            # Under concurrent load, wait while requests keep coming: each arrival allows another
            # wait_s for the next (clients answered by the last batch send their next requests one
            # after another, as fast as the event loop parses them), and the whole wait is at most
            # one wait_s per image of a full batch. Expected are the clients the last batch answered
            # plus those whose requests queued while it ran; once that many are in, it takes only
            # what is already queued (bench/README.md, serve_throughput, says why both counts).
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
        """(embeddings of the images of every request in the batch that has no error of its own,
        None), or (None, the exception that fails them all). Photos whose faces are still to be
        found (faceid.inference.Pending) are detected first, all in one call; a request with a
        photo that shows no face (or cannot be read at the scale its face needs) gets that
        ImageError as its own `error`."""
        verifier = batch[0].verifier
        started = time.perf_counter()
        try:
            everything = [im for work in batch for im in work.images]
            # a Pending photo's `prepared` is None until its face is found
            if any(getattr(im, "prepared", False) is None for im in everything):
                errors = iter(verifier.prepare_pending(everything))
                for work in batch:
                    work.error = next((e for e in [next(errors) for _ in work.images] if e is not None), None)
                detected = time.perf_counter()
            else:
                detected = started
            ok = [work for work in batch if work.error is None]
            images = [im for work in ok for im in work.images]
            embeddings = verifier.embed(images) if images else None
        except BaseException as e:  # handed to every waiting request
            return None, e
        finished = time.perf_counter()
        for work in batch:
            work.started, work.detected, work.finished, work.batch_images = started, detected, finished, len(images)
        return embeddings, None

    @staticmethod
    def _deliver(batch: list[_Work], embeddings: Any, error: Optional[BaseException]) -> None:
        start = 0
        for work in batch:
            if error is not None:
                work.future.set_exception(error)
            elif work.error is not None:
                work.future.set_exception(work.error)
            else:
                work.future.set_result(embeddings[start : start + len(work.images)])
                start += len(work.images)


class Timing:
    """Where one request's time went, for its `Server-Timing` response header (milliseconds,
    browsers' developer tools and `curl -v` show it): reading the upload, decoding, waiting for
    the worker, finding the faces and the forward pass of the batch it joined, and the hand-back
    to the event loop."""

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
        parts = [f"{n};dur={1000 * s:.2f}" + (f';desc="{d}"' if d else "") for n, s, d in self.parts]
        return ", ".join(parts + [f"total;dur={1000 * (time.perf_counter() - self.start):.2f}"])


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the operating system too (Linux: `top -H`, `ps -L`,
    /proc/PID/task/*/comm), so the forward pass's CPU time can be told from HTTP's. OpenMP threads
    that torch starts from this thread inherit the name. Elsewhere, or if it fails, nothing happens."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass
