"""Inference replicas: more server processes that answer /embed and /verify (FACEID_INFER_REPLICAS).
This module is the main server's side, which starts, supervises and feeds them; a replica's own
process is app/replica_app.py.

One server process parses every request's HTTP and multipart body, decodes its image and answers
it under one interpreter lock, and that caps it, on a small CPU and far more on a GPU, which
embeds batches much faster than one process can feed it (bench/README.md, serve_throughput). So
with FACEID_INFER_REPLICAS=N the main server starts N replicas that answer /embed, /embed/batch,
/verify, /health and /ready on FACEID_INFER_PORT (FACEID_INFER_HOST, default 127.0.0.1), each with
its own interpreter, batching worker and copy of the model. The main server accepts the
connections on that port and hands each to the next replica in turn; from then on the replica
alone serves it. Everything else (jobs, GET /model, activation) stays on the main server's port,
which still answers /embed and /verify too.

- A replica serves the model the main server serves, which it follows through the job database.
- The main server supervises them: a replica that exits is started again (after a pause if it
  died within seconds of its start), and they stop with the main server. A replica also stops by
  itself when the main server's process is gone.
- Each replica runs one inference worker on an equal share of the cores (OMP_NUM_THREADS, unless
  set), since the replicas are what runs passes at once. On a host with several GPUs, replicas
  take them in turn (FACEID_DEVICE cuda or auto; cuda:N puts them all on GPU N).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from app.paths import usable_cpus
from app.processes import describe_exit
from app.settings import Settings
from faceid.errors import ConfigError

log = logging.getLogger(__name__)

QUICK_DEATH_S = 10.0  # a replica that dies sooner than this after its start is restarted after a pause
RESTART_PAUSE_S = 5.0


def _port_error(host: str, port: int, e: OSError) -> ConfigError:
    return ConfigError(
        f"the inference replicas cannot listen on {host}:{port} ({e.strerror or e}; is another "
        "server on it?); give FACEID_INFER_PORT a free port (not the main server's), or set "
        "FACEID_INFER_REPLICAS=0"
    )


def _listen(host: str, port: int) -> socket.socket:
    """The replicas' listening socket, accepted from by the main server only. No SO_REUSEPORT: a
    port anything else listens on (another FaceID server's replicas too) is refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections in TIME_WAIT are fine
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise _port_error(host, port, e) from None
    return sock


class _Replica:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[socket.socket] = None  # the main server's end: accepted connections go down it
        self.started = 0.0
        self.restarts = 0
        self.handed = 0  # connections handed to it since the server started
        self.ready = False  # it said so down its channel once its model was loaded

    def takes(self) -> bool:
        return self.channel is not None and self.proc is not None and self.proc.poll() is None

    def is_ready(self) -> bool:
        """Up and done starting: a replica sends one byte down its channel when it can answer."""
        channel = self.channel
        if not self.ready and channel is not None and self.takes():
            try:
                self.ready = bool(channel.recv(64))
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # gone: takes() will say so
                pass
        return self.ready and self.takes()


class ReplicaSupervisor:
    """Starts `settings.infer_replicas` replica processes, restarts those that exit, stops them, and
    hands them the connections of their port in turn.

    The main server listens on FACEID_INFER_PORT itself and a thread of its own accepts there: each
    new connection goes to the next replica that is up (round robin), down a Unix socket pair, so N
    keep-alive connections are spread evenly (a socket per replica with SO_REUSEPORT let the kernel
    pick by a hash: 4 connections landed 2 and 2 on 2 replicas only 3 times in 8). The main server
    sees a connection once, when it opens; its requests go straight to the replica. While no
    replica is up, new connections wait in the port's backlog."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.n = settings.infer_replicas
        self._replicas: list[_Replica] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._acceptor: Optional[threading.Thread] = None
        self._listener: Optional[socket.socket] = None
        self._next = 0

    def _device(self, index: int) -> str:
        """Replica `index`'s FACEID_DEVICE: on a host with several GPUs, FACEID_DEVICE cuda or auto
        spreads the replicas over them in turn (replica 0 on cuda:0, 1 on cuda:1, ...); a device
        with an index, or cpu, is every replica's."""
        device = self.settings.device
        if device in ("cuda", "auto"):
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count > 1:
                return f"cuda:{index % count}"
        return device

    def _env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env["FACEID_DEVICE"] = self._device(index)
        root = str(Path(__file__).resolve().parent.parent)  # where the app package is, wherever we run
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["FACEID_REPLICA_PARENT"] = str(os.getpid())
        # The main server's absolute folders, so a replica reads the same job database.
        env["FACEID_MODELS_DIR"], env["FACEID_DATA_DIR"] = str(self.settings.models_dir), str(self.settings.data_dir)
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // max(1, self.n))))
        env["FACEID_INFER_WORKERS"] = "1"  # the replicas are the passes that run at once
        return env

    def _spawn(self, r: _Replica) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fd = theirs.fileno()
            # A session of its own: Ctrl-C on the server's terminal reaches the main server only,
            # which then stops the replicas (none is restarted meanwhile).
            env = self._env(r.index)
            r.proc = subprocess.Popen(
                [sys.executable, "-m", "app.replica_app", str(fd)],
                pass_fds=(fd,),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the replica holds it now
        ours.setblocking(False)  # a replica that stopped reading is passed over, never waited for
        if r.channel is not None:
            r.channel.close()
        r.channel, r.ready = ours, False
        r.started = time.monotonic()
        log.info(
            "inference replica %d started (pid %d, device %s) on %s:%s",
            r.index,
            r.proc.pid,
            env["FACEID_DEVICE"],
            self.settings.infer_host,
            self.settings.infer_port,
        )

    def start(self) -> None:
        """Listen on the port and start every replica; raises ConfigError when the port cannot be
        bound (nothing is left running then)."""
        assert self.settings.infer_port is not None
        self._listener = _listen(self.settings.infer_host, self.settings.infer_port)
        self._replicas = [_Replica(i) for i in range(self.n)]
        try:
            for r in self._replicas:
                self._spawn(r)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._watch, name="faceid-replicas", daemon=True)
        self._thread.start()
        self._acceptor = threading.Thread(target=self._accept, name="faceid-replica-accept", daemon=True)
        self._acceptor.start()

    def _hand(self, conn: socket.socket) -> bool:
        """Give `conn` to the next replica that is ready (one still loading its model only when
        none is); False when none takes it."""
        with self._lock:
            n = len(self._replicas)
            ready = [r for r in self._replicas if r.is_ready()]
            for i in range(n):
                r = self._replicas[(self._next + i) % n]
                channel = r.channel
                if channel is None or not r.takes() or (ready and r not in ready):
                    continue
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()])
                except OSError:  # it is gone (or not reading): the next one
                    continue
                self._next = r.index + 1
                r.handed += 1
                return True
        return False

    def _accept(self) -> None:
        assert self._listener is not None
        listener = self._listener
        listener.settimeout(0.5)  # to see the stop
        failing = False
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError as e:  # closed by stop(), or out of descriptors for a moment
                if self._stop.is_set():
                    return
                if not failing:  # once per episode, not every half second
                    log.error("accepting a connection on the replicas' port failed: %s", e)
                failing = True
                self._stop.wait(0.5)
                continue
            failing = False
            try:
                with conn:
                    try:  # handed down with the descriptor: no Nagle delay (64 ms per request without it)
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    except OSError:  # the client already reset it (some systems say so here)
                        continue
                    while not self._hand(conn):  # none up: this one waits for a restart, the rest in the backlog
                        if self._stop.wait(0.2):
                            return
            except Exception:
                log.exception("handing a connection to a replica failed")

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for r in self._replicas:
                with self._lock:
                    if self._stop.is_set() or r.proc is None or r.proc.poll() is None:
                        continue
                    quick = time.monotonic() - r.started < QUICK_DEATH_S
                    log.error(
                        "inference replica %d (pid %d): %s; starting it again%s",
                        r.index,
                        r.proc.pid,
                        describe_exit(r.proc.returncode, "the replica"),
                        f" in {RESTART_PAUSE_S:.0f} s" if quick else "",
                    )
                    r.proc = None
                if quick and self._stop.wait(RESTART_PAUSE_S):
                    return
                with self._lock:
                    if self._stop.is_set():
                        return
                    r.restarts += 1
                    try:
                        self._spawn(r)
                    except OSError as e:  # tried again on the next round
                        log.error("inference replica %d cannot be started again: %s", r.index, e)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "replicas": self.n,
                "host": self.settings.infer_host,
                "port": self.settings.infer_port,
                "pids": [r.proc.pid for r in self._replicas if r.proc is not None and r.proc.poll() is None],
                "restarts": sum(r.restarts for r in self._replicas),
                "ready": sum(r.is_ready() for r in self._replicas),
                "connections": [r.handed for r in self._replicas],
            }

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        for t in (self._thread, self._acceptor):
            if t is not None:
                t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()  # connections not yet handed to a replica are refused from here
        with self._lock:
            procs = [r.proc for r in self._replicas if r.proc is not None]
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)  # uvicorn finishes the requests in flight
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for r in self._replicas:
                r.proc = None
                if r.channel is not None:
                    r.channel.close()
                    r.channel = None
