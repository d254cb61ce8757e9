"""Forward passes in processes of their own (FACEID_INFER_PROCESSES).

With two inference worker threads in the server process, the Python parts of both forward passes
(ResNet-50's module calls, autocast, the batch transform), the event loop parsing HTTP and the
decoding threads all take turns on one interpreter lock, and cores sit idle while threads wait
for it: on 2 cores, 16 clients left about a fifth of the CPU time idle. Here each inference worker
hands its batch (the decoded uint8 images, already stacked) to a child process of its own and
waits for the embeddings without holding the lock; the child runs the network with its share of
the cores. Everything else stays in the server process: batching (app.serving.EmbedWorker),
decoding, thresholds and the model's description (a `ProcessVerifier` answers those from a local
copy of the checkpoint). bench/README.md (serve_throughput) has the measurements.

- `ProcessPool(n, threads)` starts n children at once, each connected by a socket pair;
  `load(spec)` has every child load a checkpoint before the model is swapped in, so no request
  waits for a load; `embed(spec, batch)` runs one batch on a free child, the first free one in a
  fixed order (a lone request always lands on the same warm child).
- A child keeps its two most recent models: the one being replaced finishes the requests already
  batched for it. A child that dies (killed for memory, a crash in a native library) is
  restarted at once; the requests of the batch it was running get a 503 that says to retry, the
  server keeps serving, and the next batch reloads the model in the new child.
- A child exits when the server closes the pool, or by itself when the server process is gone
  (its end of the socket reads end-of-file), so none outlives the server.

The child is `python -m app.inference_process FD THREADS`; torch is imported only there and in
`load`'s local copy, never at the routes' import.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional, Sequence

from faceid.errors import CheckpointError, FaceIDError, ModelNotReadyError

log = logging.getLogger(__name__)

KEEP_MODELS = 2  # per child: the served model and the one it replaced (requests still in flight)
START_TIMEOUT_S = 120.0  # importing torch on a slow, busy machine; loading is not part of it


@dataclass(frozen=True)
class ModelSpec:
    """What a child needs to build the served Verifier as app.serving.load_verifier would."""
    path: str
    device: str
    compile: str
    max_batch: int
    workers: int
    threads: int


class ChildError(Exception):
    """An error the child reported: its class name and message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _describe_exit(rc: Optional[int]) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
    return f"exit code {rc}"


class _Child:
    """One inference process and the server's end of its socket. Used by one thread at a time
    (ProcessPool hands it out)."""

    def __init__(self, threads: int, index: int) -> None:
        self.threads, self.index = threads, index
        self.busy = False
        self.proc: Optional[subprocess.Popen] = None
        self.conn: Optional[Connection] = None
        self.ready = False
        self.closing = False  # set by ProcessPool.close: a broken socket then is no death to repair
        self.start()

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # where the app package is, wherever we run
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "app.inference_process", str(theirs.fileno()),
                                          str(self.threads)], pass_fds=(theirs.fileno(),), env=env,
                                         stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False

    def _wait_ready(self) -> None:
        assert self.conn is not None and self.proc is not None
        if not self.conn.poll(START_TIMEOUT_S):
            self.stop()
            raise ModelNotReadyError(f"the inference process did not start within {START_TIMEOUT_S:.0f} s; "
                                     "see the server log, or set FACEID_INFER_PROCESSES=off")
        self.conn.recv()  # ("ready", pid)
        self.ready = True

    def call(self, message: tuple) -> Any:
        """Send `message`, return the child's answer. Raises ChildError for an error it reported,
        ModelNotReadyError when it died (it is restarted before this returns)."""
        try:
            if not self.ready:
                self._wait_ready()
            assert self.conn is not None
            self.conn.send(message)
            reply = self.conn.recv()
        except (EOFError, OSError) as e:
            if self.closing:
                raise ModelNotReadyError("the server is shutting down") from e
            rc = self.stop(kill=False)
            log.error("inference process %d stopped (%s) while running a %s; restarting it", self.index,
                      _describe_exit(rc), message[0])
            self.start()
            raise ModelNotReadyError(f"the inference process stopped ({_describe_exit(rc)}) while running "
                                     "this request; it has been restarted: retry the request") from e
        if reply[0] == "error":
            raise ChildError(reply[1], reply[2])
        return reply[1]

    def stop(self, kill: bool = True, timeout: float = 5.0) -> Optional[int]:
        """Close the socket (the child exits on end-of-file) and reap it; returns its exit code."""
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout if kill else 10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


class ProcessPool:
    """`n` inference processes, each with `threads` torch compute threads."""

    def __init__(self, n: int, threads: int) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._children = [_Child(threads, i) for i in range(max(1, n))]

    def __len__(self) -> int:
        return len(self._children)

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None]

    def _acquire(self, among: Optional[Sequence[_Child]] = None) -> _Child:
        with self._cond:
            while True:
                if self._closed:
                    raise ModelNotReadyError("the server is shutting down")
                for child in among or self._children:
                    if not child.busy:
                        child.busy = True
                        return child
                self._cond.wait()

    def _release(self, child: _Child) -> None:
        with self._cond:
            child.busy = False
            self._cond.notify_all()

    def _call(self, message: tuple, among: Optional[Sequence[_Child]] = None) -> Any:
        child = self._acquire(among)
        try:
            return child.call(message)
        finally:
            self._release(child)

    def load(self, spec: ModelSpec) -> None:
        """Every child loads (and, with a compile mode, warms up) `spec`'s model, all at once, each
        as soon as its batch in flight is done. Raises CheckpointError with the child's message."""
        def one(child: _Child) -> None:
            try:
                self._call(("load", spec), among=[child])
            except ChildError as e:  # load_verifier's own errors say what to do; others get a context
                raise CheckpointError(str(e) if e.kind in _FACEID_ERRORS
                                      else f"cannot load {spec.path} in the inference process: {e.kind}: {e}") from None

        with concurrent.futures.ThreadPoolExecutor(len(self._children), thread_name_prefix="faceid-load") as ex:
            for future in [ex.submit(one, child) for child in self._children]:
                future.result()

    def embed(self, spec: ModelSpec, batch: Any) -> Any:
        """uint8 numpy [B, 3, S, S] -> float32 numpy [B, D], on the first free child."""
        try:
            return self._call(("embed", spec, batch))
        except ChildError as e:
            if e.kind in _FACEID_ERRORS:
                raise _FACEID_ERRORS[e.kind](str(e)) from None
            raise RuntimeError(f"the inference process failed: {e.kind}: {e}") from None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for child in self._children:
            child.closing = True
            child.stop()


def _faceid_errors() -> dict[str, type]:
    from faceid import errors

    return {name: cls for name, cls in vars(errors).items()
            if isinstance(cls, type) and issubclass(cls, FaceIDError)}


_FACEID_ERRORS = _faceid_errors()


class ProcessVerifier:
    """A Verifier whose forward passes run in a ProcessPool. Decoding (`open`, `prepare`,
    `decode_side`), thresholds (`resolve_threshold`, `compare`) and `info` are those of `local`,
    the checkpoint loaded in the server process."""

    def __init__(self, local: Any, pool: ProcessPool, spec: ModelSpec) -> None:
        self.local, self.pool, self.spec = local, pool, spec

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)

    def embed(self, images: Sequence[Any]) -> Any:
        import numpy as np
        import torch

        if not images:
            return np.zeros((0, self.local.embedding_size), np.float32)
        batch = torch.stack([im if isinstance(im, torch.Tensor) else self.local.prepare(im) for im in images])
        return self.pool.embed(self.spec, batch.numpy())

    def verify(self, img1: Any, img2: Any, threshold: Any = None) -> dict[str, Any]:
        self.local.resolve_threshold(threshold)
        e = self.embed([img1, img2])
        return self.local.compare(e[0], e[1], threshold)


# -- the child ------------------------------------------------------------------------------------


def _serve(conn: Connection, threads: int) -> int:
    import torch

    from app.serving import load_verifier

    torch.set_num_threads(max(1, threads))
    models: collections.OrderedDict[ModelSpec, Any] = collections.OrderedDict()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server closed the pool or is gone
            return 0
        try:
            op, spec = message[0], message[1]
            verifier = models.get(spec)
            if verifier is None:
                t = time.monotonic()
                verifier = load_verifier(Path(spec.path), spec.device, compile=spec.compile,
                                         max_batch=spec.max_batch, workers=spec.workers, threads=spec.threads)
                torch.set_num_threads(max(1, threads))  # load_verifier sets it only for workers > 1
                models[spec] = verifier
                while len(models) > KEEP_MODELS:
                    models.popitem(last=False)
                log.info("inference process %d loaded %s in %.1f s", os.getpid(), spec.path, time.monotonic() - t)
            else:
                models.move_to_end(spec)
            if op == "load":
                reply: tuple = ("ok", None)
            elif op == "embed":
                reply = ("ok", verifier.embed_tensors(torch.from_numpy(message[2])))
            else:
                reply = ("error", "ValueError", f"unknown operation {op!r}")
        except Exception as e:  # noqa: BLE001 - reported to the server, which answers the request
            reply = ("error", type(e).__name__, str(e))
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m app.inference_process FD THREADS (started by the FaceID server)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the server's terminal: the server closes us
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    from app.serving import _name_os_thread

    _name_os_thread("faceid-embed")  # as the server's inference threads (bench/serve_throughput.py counts them)
    return _serve(Connection(int(args[0])), int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
