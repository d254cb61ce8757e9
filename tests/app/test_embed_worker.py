"""EmbedWorker: requests that queue while a forward pass runs share the next one, even with no
batch wait; a full batch or another model starts a new one; the batch wait applies under
concurrent load, never to a lone request, is renewed by each arrival, and ends once the clients
the last batch answered and those whose requests queued while it ran are in."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.batcher import EmbedWorker


class BlockingVerifier:
    """Records each batch; the first call blocks until `release` is set."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed(self, images):
        self.calls.append(list(images))
        self.entered.set()
        if len(self.calls) == 1:
            assert self.release.wait(10)
        return np.array([[float(i), 1.0] for i in images], np.float32)


async def _busy_then(worker: EmbedWorker, first_verifier, rest: list[tuple[object, list[int]]]):
    first = asyncio.ensure_future(worker.embed(first_verifier, [0]))
    assert await asyncio.to_thread(first_verifier.entered.wait, 10)  # the worker is now busy
    others = [asyncio.ensure_future(worker.embed(v, imgs)) for v, imgs in rest]
    await asyncio.sleep(0.05)  # every request is queued before the worker is free
    first_verifier.release.set()
    return await first, await asyncio.gather(*others)


@pytest.mark.anyio
async def test_requests_queued_during_a_forward_pass_share_the_next_one():
    worker = EmbedWorker(max_batch=16, wait_ms=0)
    try:
        v = BlockingVerifier()
        first, others = await _busy_then(worker, v, [(v, [i]) for i in range(1, 6)])
    finally:
        worker.close()
    assert v.calls == [[0], [1, 2, 3, 4, 5]]
    assert first.tolist() == [[0.0, 1.0]]
    assert [o[:, 0].tolist() for o in others] == [[1.0], [2.0], [3.0], [4.0], [5.0]]  # each its own rows


@pytest.mark.anyio
async def test_a_full_batch_or_another_model_starts_a_new_batch():
    worker = EmbedWorker(max_batch=3, wait_ms=0)
    try:
        v, w = BlockingVerifier(), BlockingVerifier()
        w.release.set()
        _, others = await _busy_then(worker, v, [(v, [1, 2]), (v, [3]), (v, [4]), (w, [5]), (v, [6])])
    finally:
        worker.close()
    # [1, 2] + [3] fill the batch of 3; [4] starts the next; w's request is a batch of its own
    assert v.calls == [[0], [1, 2, 3], [4], [6]] and w.calls == [[5]]
    assert [o[:, 0].tolist() for o in others] == [[1.0, 2.0], [3.0], [4.0], [5.0], [6.0]]


class RecordingVerifier:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def embed(self, images):
        self.calls.append(list(images))
        return np.array([[float(i), 1.0] for i in images], np.float32)


@pytest.mark.anyio
async def test_a_lone_request_does_not_wait_for_company():
    # A 30 s batch wait would hold a waiting request for 30 s; one client's request runs at once.
    worker = EmbedWorker(max_batch=16, wait_ms=30_000)
    try:
        v = RecordingVerifier()
        for i in range(3):
            out = await asyncio.wait_for(worker.embed(v, [i]), timeout=10)
            assert out[:, 0].tolist() == [float(i)]
    finally:
        worker.close()
    assert v.calls == [[0], [1], [2]]


@pytest.mark.anyio
async def test_under_concurrent_load_the_worker_waits_for_requests_on_their_way():
    worker = EmbedWorker(max_batch=4, wait_ms=30_000)
    try:
        v = BlockingVerifier()
        # Four requests queue during a forward pass: a full batch of them, concurrent load.
        await _busy_then(worker, v, [(v, [1]), (v, [2]), (v, [3]), (v, [4])])
        # So the next request waits for company: one sent 0.2 s later joins its batch (at wait 0
        # they would be two batches); two more fill the batch, which ends the wait.
        a = asyncio.ensure_future(worker.embed(v, [5]))
        await asyncio.sleep(0.2)
        b = asyncio.ensure_future(worker.embed(v, [6]))
        rest = [asyncio.ensure_future(worker.embed(v, [i])) for i in (7, 8)]
        await asyncio.wait_for(asyncio.gather(a, b, *rest), timeout=10)
    finally:
        worker.close()
    assert v.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]


async def _spaced(worker: EmbedWorker, v, ids: list[int], gap_s: float) -> None:
    futures = []
    for k, i in enumerate(ids):
        if k:
            await asyncio.sleep(gap_s)
        futures.append(asyncio.ensure_future(worker.embed(v, [i])))
    await asyncio.wait_for(asyncio.gather(*futures), timeout=20)


@pytest.mark.anyio
async def test_each_arrival_extends_the_wait_and_a_longer_gap_ends_it():
    worker = EmbedWorker(max_batch=8, wait_ms=400)
    try:
        v = BlockingVerifier()
        await _busy_then(worker, v, [(v, [1]), (v, [2]), (v, [3]), (v, [4])])
        # 4 requests 0.2 s apart span 0.6 s, more than one 0.4 s wait: still one batch
        await _spaced(worker, v, [5, 6, 7, 8], 0.2)
        # a gap longer than the wait closes the batch
        await _spaced(worker, v, [9, 10], 1.0)
    finally:
        worker.close()
    assert v.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9], [10]]


@pytest.mark.anyio
async def test_the_wait_ends_once_the_clients_of_the_last_batch_and_those_queued_during_it_are_in():
    # A 30 s wait and room for 8. Request 0 runs alone while 1-4 queue: the next batch expects
    # 1-4 and 0's client coming back (5), so it waits for request 5, 0.2 s later, then runs at once.
    worker = EmbedWorker(max_batch=8, wait_ms=30_000)
    try:
        v = BlockingVerifier()
        first = asyncio.ensure_future(worker.embed(v, [0]))
        assert await asyncio.to_thread(v.entered.wait, 10)
        queued = [asyncio.ensure_future(worker.embed(v, [i])) for i in (1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        v.release.set()
        await asyncio.wait_for(first, timeout=10)
        await asyncio.sleep(0.2)
        late = asyncio.ensure_future(worker.embed(v, [5]))
        await asyncio.wait_for(asyncio.gather(late, *queued), timeout=10)
        # the 5 clients of that batch are back one after another: one batch, no 30 s wait
        await _spaced(worker, v, [6, 7, 8, 9, 10], 0.05)
    finally:
        worker.close()
    assert v.calls == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"), reason="Linux /proc only")
def test_the_worker_thread_carries_its_name_in_the_operating_system():
    """`top -H` and the serving benchmark's CPU split find the forward-pass thread by this name."""
    seen: list[int] = []

    class Recorder:
        def embed(self, images):
            with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
                seen.append(f.read().strip())
            return np.zeros((len(images), 2), np.float32)

    worker = EmbedWorker(max_batch=4, wait_ms=0)
    try:
        asyncio.run(worker.embed(Recorder(), [1]))
    finally:
        worker.close()
    assert seen == ["faceid-embed"]
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        assert f.read().strip() != "faceid-embed"  # the caller's thread keeps its own name


class BarrierVerifier:
    """Each forward pass waits until `parties` passes are inside at once (or times out)."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=5)
        self.entered = threading.Event()

    def embed(self, images):
        self.entered.set()
        self.barrier.wait()  # BrokenBarrierError unless another pass runs meanwhile
        return np.array([[float(i), 1.0] for i in images], np.float32)


async def _second_while_first_runs(worker: EmbedWorker, v: BarrierVerifier):
    """A request, then another once the first's forward pass has started."""
    first = asyncio.ensure_future(worker.embed(v, [1]))
    assert await asyncio.to_thread(v.entered.wait, 10)
    return first, asyncio.ensure_future(worker.embed(v, [2]))


@pytest.mark.anyio
async def test_two_workers_run_two_forward_passes_at_once():
    """With workers=2 a request that arrives while one forward pass runs starts its own on the
    other worker instead of waiting; both finish, and every worker thread ends at close()."""
    worker = EmbedWorker(max_batch=16, wait_ms=0, workers=2)
    v = BarrierVerifier(2)
    try:
        first, second = await _second_while_first_runs(worker, v)
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert a[0][0] == 1.0 and b[0][0] == 2.0
        stats = worker.stats()
        assert (stats["workers"], stats["batches"], stats["requests"], stats["images"]) == (2, 2, 2, 2)
    finally:
        worker.close()
    assert not any(t.is_alive() for t in worker._threads)


@pytest.mark.anyio
async def test_one_worker_runs_one_forward_pass_at_a_time():
    """The same two requests with one worker: the second waits for the first, so a pass that
    needs another one beside it times out (the failure is handed to the request)."""
    worker = EmbedWorker(max_batch=16, wait_ms=0, workers=1)
    v = BarrierVerifier(2)
    try:
        first, second = await _second_while_first_runs(worker, v)
        with pytest.raises(threading.BrokenBarrierError):
            await first
        with pytest.raises(threading.BrokenBarrierError):  # the barrier stays broken
            await second
    finally:
        worker.close()


@pytest.mark.anyio
async def test_with_two_workers_lone_requests_all_run_on_the_first():
    """One request at a time never wakes the second worker: every pass runs on the same thread
    (alternating threads cost a lone request its warm caches)."""
    worker = EmbedWorker(max_batch=16, wait_ms=0, workers=2)
    seen: list[int] = []

    class Recording:
        def embed(self, images):
            seen.append(threading.current_thread().ident)
            return np.array([[float(i), 1.0] for i in images], np.float32)

    try:
        v = Recording()
        for i in range(8):
            out = await worker.embed(v, [i])
            assert out[0][0] == float(i)
            await asyncio.sleep(0.005)  # the client's turn-around between requests
    finally:
        worker.close()
    assert len(seen) == 8 and len(set(seen)) == 1
    assert not any(t.is_alive() for t in worker._threads)


class _CallsByThread:
    """The worker's queue, counting the calls each thread makes on it."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: dict[int, int] = {}

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            me = threading.get_ident()
            self.calls[me] = self.calls.get(me, 0) + 1
            return attr(*args, **kwargs)

        return counted


@pytest.mark.anyio
async def test_the_second_worker_sleeps_through_a_lone_forward_pass():
    """While the first worker runs a lone request's forward pass and nothing is queued, the
    second worker is not woken to look at the queue (a 2 ms poll cost 1.6 ms of CPU per lone
    request beside its forward pass); a request queued meanwhile still goes to it at once."""
    worker = EmbedWorker(max_batch=16, wait_ms=0, workers=2)
    counting = _CallsByThread(worker._queue)
    worker._queue = counting
    helper = worker._threads[1].ident
    v = BlockingVerifier()
    try:
        first = asyncio.ensure_future(worker.embed(v, [0]))
        assert await asyncio.to_thread(v.entered.wait, 10)
        await asyncio.sleep(0.3)  # a long forward pass with an empty queue
        assert counting.calls.get(helper, 0) == 0
        second = await asyncio.wait_for(worker.embed(v, [1]), 10)  # the helper takes it at once
        assert second[0][0] == 1.0 and not first.done()
        v.release.set()
        assert (await first)[0][0] == 0.0
    finally:
        v.release.set()
        worker.close()
    assert counting.calls.get(helper, 0) >= 1


@pytest.mark.anyio
async def test_each_worker_judges_the_load_by_its_own_last_batch():
    """The first worker answered a lone request while the second ran a batch of 5; the next lone
    request on the first worker is not held for company the second worker's batch suggested
    (with one shared count it waited the full 2 s batch wait)."""
    worker = EmbedWorker(max_batch=16, wait_ms=2000, workers=2)
    v = BlockingVerifier()
    try:
        first = asyncio.ensure_future(worker.embed(v, [0]))
        assert await asyncio.to_thread(v.entered.wait, 10)
        batch = await asyncio.wait_for(asyncio.gather(*(worker.embed(v, [i]) for i in range(1, 6))), 10)
        assert [b[0][0] for b in batch] == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert v.calls[1] == [1, 2, 3, 4, 5]  # one batch on the second worker
        v.release.set()
        await first
        t0 = asyncio.get_running_loop().time()
        lone = await asyncio.wait_for(worker.embed(v, [6]), 10)
        assert lone[0][0] == 6.0
        assert asyncio.get_running_loop().time() - t0 < 1.0
    finally:
        v.release.set()
        worker.close()


class _FirstWorkerGated:
    """The worker's queue; the first worker's wait for a new request (a plain `get()`) is held
    until `gate` is set, so requests can all be queued before it looks."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get(self, *args, **kwargs):
        if not args and not kwargs:
            assert self.gate.wait(10)
        return self._inner.get(*args, **kwargs)


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_a_burst_is_shared_between_free_workers(workers):
    """Twelve requests that queue while every worker is free run as one batch per worker, all at
    once (two workers: 6 + 6, three: 4 + 4 + 4), instead of one batch of twelve on the first
    thread while the other cores idle (one worker: one batch of twelve). Every request gets its
    own rows back."""
    worker = EmbedWorker(max_batch=16, wait_ms=0, workers=workers)
    gated = _FirstWorkerGated(worker._queue)
    worker._queue = gated
    sizes: list[int] = []
    together = threading.Barrier(workers, timeout=5)  # passes only when every worker runs a pass

    class Recording:
        def embed(self, images):
            sizes.append(len(images))
            together.wait()
            return np.array([[float(i), 1.0] for i in images], np.float32)

    try:
        v = Recording()
        pending = [asyncio.ensure_future(worker.embed(v, [i])) for i in range(12)]
        await asyncio.sleep(0.05)  # all twelve are queued; no worker has looked yet
        gated.gate.set()
        out = await asyncio.wait_for(asyncio.gather(*pending), 10)
    finally:
        gated.gate.set()
        worker.close()
    assert [o[0][0] for o in out] == [float(i) for i in range(12)]
    assert sizes == [12 // workers] * workers
    assert worker._in_flight == 0


@pytest.mark.anyio
@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_random_load_with_cancellations_answers_every_request_with_its_own_rows(workers):
    """Clients come and go at random (one or two images a request, some cancelled while queued or
    running): every request that is not cancelled gets exactly its own rows, no batch exceeds the
    maximum, and the count of images in flight, which sizes each worker's share, returns to zero."""
    import random

    rng = random.Random(workers)
    worker = EmbedWorker(max_batch=6, wait_ms=1, workers=workers)
    sizes: list[int] = []

    class Sleepy:
        def embed(self, images):
            sizes.append(len(images))
            threading.Event().wait(rng.uniform(0.0005, 0.004))
            return np.array([[float(i), 1.0] for i in images], np.float32)

    v = Sleepy()

    async def client(c: int) -> int:
        done = 0
        for k in range(12):
            images = [c * 1000 + k * 10 + j for j in range(rng.choice([1, 1, 2]))]
            task = asyncio.ensure_future(worker.embed(v, images))
            if rng.random() < 0.15:
                await asyncio.sleep(rng.uniform(0, 0.002))
                task.cancel()
            try:
                out = await task
            except asyncio.CancelledError:
                continue
            assert out[:, 0].tolist() == [float(i) for i in images]
            done += 1
            await asyncio.sleep(rng.uniform(0, 0.003))
        return done

    try:
        answered = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(10))), 60)
        for _ in range(100):  # a cancelled request still queued is dropped when a worker reaches it
            if worker._in_flight == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        worker.close()
    assert sum(answered) > 60 and max(sizes) <= 6
    assert worker._in_flight == 0


class SleepyVerifier:
    """A forward pass of `seconds`, whatever the batch; records each batch's size."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sizes: list[int] = []

    def embed(self, images):
        self.sizes.append(len(images))
        threading.Event().wait(self.seconds)
        return np.array([[float(i), 1.0] for i in images], np.float32)


@pytest.mark.anyio
async def test_two_clients_out_of_step_come_to_share_one_worker_s_passes():
    """Client B sends while A's pass runs, A's next request then arrives while B's runs: without
    counting the request that queued during the last pass as company, the one worker ran every
    pass with one image, forever (an inference replica, which runs one worker, served a few
    clients far slower than the main port's two workers)."""
    worker = EmbedWorker(max_batch=16, wait_ms=5, workers=1)
    v = SleepyVerifier(0.02)
    stop = asyncio.get_running_loop().time() + 0.8

    async def client(delay: float) -> None:
        await asyncio.sleep(delay)
        while asyncio.get_running_loop().time() < stop:
            await worker.embed(v, [1])

    try:
        await asyncio.gather(client(0.0), client(0.01))
    finally:
        worker.close()
    later = v.sizes[len(v.sizes) // 2 :]
    assert sum(later) / len(later) > 1.8, v.sizes
