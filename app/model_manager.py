"""The served model: which checkpoint answers /embed and /verify, and what those routes call.

- A switch is atomic: the new Verifier is built completely, then one reference is replaced. A
  request holds the `ServedModel` it started with, so requests in flight finish on the old model.
- Each upload is decoded and prepared for the model on a decoding thread as it arrives
  (`ModelManager.decode`: `Verifier.prepare`, or, for a model trained on aligned faces, `pending`),
  so the batching worker (app/batcher.py) only finds the faces of a batch in one call, aligns them
  and runs the forward pass, as many at once as `inference_plan` says.
- The choice survives a restart: the served checkpoint is remembered in the job database, where
  inference replicas (app/replica_app.py) follow it.

torch is imported only here, lazily, through faceid.inference: routes never import it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import anyio

from app.batcher import EmbedWorker, Timing
from app.paths import usable_cpus
from app.settings import Settings
from app.store import JobStateError, JobStore
from faceid.errors import CheckpointError, FaceIDError, ImageError, ModelNotReadyError

log = logging.getLogger(__name__)


STATE_KEY = "served_model"
# What a request needing a model is told before there is one (the 503s of /embed, /verify, /ready, /model)
NO_MODEL = (
    "no model is loaded yet: train one with POST /jobs (it is served when the job succeeds), serve a "
    "finished job with POST /models/{job_id}/activate, or start the server with "
    "FACEID_CHECKPOINT=path/to/backbone_best.pt"
)
ENV_STATE_KEY = "env_checkpoint_applied"
# follow_jobs: how long before reading the succeeded jobs a choice counts as made (see there)
FOLLOW_MARGIN_S = 1.0
# A photo waiting for the worker to find its face is held decoded (3 bytes a pixel, until its
# batch runs); larger photos are detected and aligned on their decoding thread instead, so a burst
# of 40 MP uploads holds their small aligned crops, not gigabytes of pixels. A large JPEG counts
# as decoded for detection (faceid.faces.Photo: a phone photo at a quarter of its size or less).
BATCHED_DETECTION_MAX_PIXELS = 4_000_000

# (checkpoint path, device) -> an object with embed(images), compare(e1, e2, threshold),
# resolve_threshold(threshold) and info, as faceid.inference.Verifier (docs/CONTRACTS.md, 3).
VerifierLoader = Callable[[Path, str], Any]


def inference_plan(requested: int, device: str) -> tuple[int, int]:
    """(forward passes run at once, torch compute threads for each) for FACEID_INFER_WORKERS =
    `requested` (0: decide) on FACEID_DEVICE = `device`. By default two on a CPU with two or more
    cores, each on half of them (why two: bench/README.md, serve_throughput); a GPU runs one at a
    time."""
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


def load_verifier(
    path: Path, device: str, *, compile: str = "off", max_batch: int = 16, workers: int = 1, threads: int = 0
) -> Any:
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
            raise CheckpointError(
                f"FACEID_COMPILE={compile} failed for {path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); set FACEID_COMPILE=off "
                "to serve it uncompiled"
            ) from None
        log.info("compiled %s for %d batch sizes in %.0f s", path, n, time.monotonic() - t)
    return verifier


def open_upload(data: bytes, *, max_pixels: int, name: str, reduce_to: Optional[int] = None) -> Any:
    from faceid.images import open_image

    return open_image(bytes(data), max_pixels=max_pixels, name=name, reduce_to=reduce_to)


@dataclass(frozen=True)
class ServedModel:
    id: str  # the job id, or "checkpoint-<hash>" for a file given at start
    job_id: Optional[str]
    checkpoint: str
    source: str  # "job" (newest succeeded job), "activated", "env" (FACEID_CHECKPOINT)
    pinned: bool
    loaded_at: float
    verifier: Any
    chosen_at: float = 0.0  # when it was chosen to be served, before it loaded (kept across restarts)

    def describe(self) -> dict[str, Any]:
        info = dict(self.verifier.info)
        return {
            "id": self.id,
            "job_id": self.job_id,
            "checkpoint": self.checkpoint,
            "source": self.source,
            "pinned": self.pinned,
            "loaded_at": self.loaded_at,
            "epoch": info.get("epoch"),
            "metrics": info.get("metrics") or {},
            "thresholds": info.get("thresholds") or {},
            "img_size": info.get("img_size"),
            "crop": info.get("crop"),
            "embedding_size": info.get("embedding_size"),
            "arch": info.get("arch"),
            "train_mode": info.get("train_mode"),
            "faces": info.get("faces"),
        }


def _checkpoint_id(path: Path) -> str:
    return "checkpoint-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]


class ModelManager:
    """Owns the served model: chooses it at start, switches it, and runs inference."""

    def __init__(self, settings: Settings, store: JobStore, loader: Optional[VerifierLoader] = None) -> None:
        self.settings = settings
        self.store = store
        workers, threads = inference_plan(settings.infer_workers, settings.device)
        self.loader = loader or functools.partial(
            load_verifier, compile=settings.compile, max_batch=settings.batch_max_size, workers=workers, threads=threads
        )
        # Whether a checkpoint could be served, without serving it (a job that succeeds while a
        # model is pinned): built as the loader builds it, but never compiled
        self.checker = loader or load_verifier
        self._current: Optional[ServedModel] = None
        self._followed: Optional[tuple] = None  # (checkpoint, loaded_at) follow() last acted on
        # (job id, finished_at) follow_jobs() does not try again: it failed to load, or a pinned model stayed
        self._followed_job: Optional[tuple] = None
        self._stop_watch = threading.Event()
        self._watcher: Optional[threading.Thread] = None
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

    def load(
        self,
        path: Path,
        *,
        job_id: Optional[str],
        source: str,
        pinned: bool,
        unless_pinned: bool = False,
        remember: bool = True,
        chosen_at: Optional[float] = None,
    ) -> Optional[ServedModel]:
        """Build the Verifier for `path`, then make it the served model. Raises CheckpointError
        (the current model stays). With `unless_pinned`, a pinned model is kept (returns None).
        With `remember`, the job database records it (a replica, which follows it, does not)."""
        # When this model was chosen, before it loads: a job that succeeds while it loads is newer
        # (follow_jobs serves it next)
        decided = time.time()
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
            served = ServedModel(
                id=job_id or _checkpoint_id(Path(path)),
                job_id=job_id,
                checkpoint=str(path),
                source=source,
                pinned=pinned,
                loaded_at=time.time(),
                verifier=verifier,
                chosen_at=decided if chosen_at is None else float(chosen_at),
            )
            self._current = served  # the switch: one reference assignment
            self.last_error = None
            if remember:  # loaded_at: a replica reloads a checkpoint rewritten in place (a resumed job)
                self.store.set_state(
                    STATE_KEY,
                    {
                        "checkpoint": str(path),
                        "job_id": job_id,
                        "source": source,
                        "pinned": pinned,
                        "loaded_at": served.loaded_at,
                        "chosen_at": served.chosen_at,
                    },
                )
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
                self.load(
                    Path(remembered["checkpoint"]),
                    job_id=remembered.get("job_id"),
                    source=remembered.get("source", "job"),
                    pinned=bool(remembered.get("pinned")),
                    # chosen before the restart: a job that succeeded since (in a worker) is newer
                    chosen_at=remembered.get("chosen_at", remembered.get("loaded_at")),
                )
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
        """An inference replica's step (app/replica_app.py): serve the model the job database says the
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
            self.load(
                Path(state["checkpoint"]),
                job_id=state.get("job_id"),
                source=state.get("source", "job"),
                pinned=bool(state.get("pinned")),
                remember=False,
            )
        except FaceIDError as e:
            log.error("the main server's model %s cannot be served here: %s", state["checkpoint"], e)
            return False
        return True

    def follow_jobs(self) -> bool:
        """Serve a job that succeeded in another process (a `faceid worker`) as the server's own
        runner would have served it (on_job_succeeded: unless a model is pinned): the job that
        succeeded last, when that was after the served model was loaded. True when it switched; a
        checkpoint that fails to load is logged once."""
        # When the choice is made: before the jobs are read, and FOLLOW_MARGIN_S earlier still,
        # because a worker takes a job's finished_at just before it writes the status. A job that
        # becomes `succeeded` after this read is then newer than the model chosen from it.
        chosen_at = time.time() - FOLLOW_MARGIN_S
        jobs, _ = self.store.list(status="succeeded", limit=20)
        jobs = [j for j in jobs if j.get("checkpoint") and j.get("finished_at")]
        if not jobs:
            return False
        job = max(jobs, key=lambda j: j["finished_at"])
        key = (job["id"], job["finished_at"])
        current = self._current
        if key == self._followed_job or (
            current is not None
            and (
                current.chosen_at >= job["finished_at"]  # chosen after it succeeded
                # its own runner served it just before marking it succeeded
                or (current.job_id == job["id"] and current.loaded_at >= (job.get("started_at") or 0))
            )
        ):
            return False
        try:
            self.on_job_succeeded(job, chosen_at=chosen_at)
        except FaceIDError as e:
            self._followed_job = key
            log.error("job %s succeeded in another process, but its checkpoint cannot be served: %s", job["id"], e)
            return False
        served = self._current is not None and self._current.job_id == job["id"]
        if not served:  # a pinned model stayed
            self._followed_job = key
        return served

    def watch_jobs(self, interval_s: float = 2.0) -> None:
        """follow_jobs() every `interval_s` seconds in a thread, until close()."""

        def watch() -> None:
            while not self._stop_watch.wait(interval_s):
                try:
                    self.follow_jobs()
                except Exception:  # the store is closing
                    log.exception("following the succeeded jobs failed")

        self._watcher = threading.Thread(target=watch, name="faceid-follow-jobs", daemon=True)
        self._watcher.start()

    def on_job_succeeded(self, job: dict[str, Any], chosen_at: Optional[float] = None) -> None:
        """Called by the runner: serve the new job's best checkpoint unless a model is pinned.
        `chosen_at`: when it was chosen (`load`'s)."""
        self.load(
            Path(job["checkpoint"]),
            job_id=job["id"],
            source="job",
            pinned=False,
            unless_pinned=True,
            chosen_at=chosen_at,
        )

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
            raise CheckpointError(
                f"job {job_id}'s checkpoint cannot be served ({e}); the current model stays"
            ) from None

    # -- inference ---------------------------------------------------------------------------

    async def decode(
        self, data: bytes, name: str, model: ServedModel, detect: bool = True, min_face: Optional[float] = None
    ) -> Any:
        """The upload as the image `model` embeds, decoded off the event loop and prepared for it
        there: resized to its input size, or, for a model trained on aligned faces, decoded as its
        training data was (`open_photo`: a large JPEG at a reduced scale) and shrunk for detection
        (its `pending`): the worker finds the faces of a whole batch in one call, then aligns them
        (app/batcher.py); a photo above BATCHED_DETECTION_MAX_PIXELS is detected and aligned here.
        An upload that is not an image is an ImageError naming the form field; so is one in which
        no face is found. `min_face`: faces down to this percent of the photo's longer side are
        looked for (Verifier.detector_for), where the model's own detection stops at larger ones."""
        verifier = model.verifier
        pending = getattr(verifier, "pending", None) if getattr(verifier, "detector", None) is not None else None
        prepare_face = getattr(verifier, "prepare_face", None)
        prepare = getattr(verifier, "prepare", None)
        side = getattr(verifier, "decode_side", None)  # large JPEGs as its training decoded them

        def work() -> Any:
            try:
                if pending is not None and detect:  # decoded as its training data was (Verifier.open_photo)
                    detector = verifier.detector_for(min_face)
                    photo = verifier.read(data, True, detector, max_pixels=self.settings.max_pixels, name=name)
                    w, h = photo.image.size  # as held while it waits
                    if w * h <= BATCHED_DETECTION_MAX_PIXELS:
                        return pending(photo, name, detector)
                    return verifier.prepare_face(photo, True, detector)
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
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self._worker.close()
