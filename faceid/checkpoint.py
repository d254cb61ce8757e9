"""Self-describing checkpoints, written atomically (see docs/CONTRACTS.md, section 2)."""

from __future__ import annotations

import json
import os
import pickle
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from faceid.errors import CheckpointError

FORMAT = "faceid-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "format_version",
    "arch",
    "embedding_size",
    "img_size",
    "normalize",
    "config",
    "epoch",
    "metrics",
    "thresholds",
    "model",
)
CHECKPOINT_FILES = ("backbone_best.pt", "last.pt")
EXPECTED_CHECKPOINT = "a backbone_best.pt or last.pt written by faceid train"

# torch.save writes a zip archive, or (the legacy format, and torch.save(..., pickle_protocol>=2))
# a pickle, whose first byte is the PROTO opcode 0x80. Anything else is not a file it wrote.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def save_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as JSON to `path` atomically (a temp file in the same folder, then os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write `obj` to `path` through a temp file in the same folder and os.replace, so a reader
    (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint dict that training can no longer change: every tensor copied to the
    CPU (a CPU tensor too: state_dict() hands out the live weights), dicts, lists and tuples
    rebuilt; other values (numbers, strings) shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints (`save_checkpoint`) on one background thread, in the order they are
    given, while training goes on. `submit` copies the dict first (`snapshot`), and waits only
    while an earlier write of the same file is still going, so at most one copy per file is held.
    Its `done` runs on the writer thread once the file is in place (the run's Checkpoint event: a
    reader never hears of a file before it exists); `then(fn)` runs `fn` there after every write
    submitted before it (the epoch's record, reported once its checkpoints are on disk). After a
    write fails, nothing queued behind it is written or run, as if the run had stopped there, and
    `check`, `submit`, `then` and `wait` raise its error from then on."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Optional[tuple[Any, Optional[Path], Optional[Callable[[], None]]]]] = queue.Queue()
        self._pending: dict[Path, int] = {}  # writes of each file not yet done
        self._queued = 0  # writes and `then` calls not yet done
        self._changed = threading.Condition()
        self._error: Optional[BaseException] = None  # the write that failed: nothing more is written
        self._thread = threading.Thread(target=self._loop, name="faceid-checkpoints", daemon=True)
        self._thread.start()

    def submit(self, obj: dict[str, Any], path: str | Path, done: Optional[Callable[[], None]] = None) -> None:
        path = Path(path)
        with self._changed:
            self._changed.wait_for(lambda: not self._pending.get(path) or self._error is not None)
            self._raise()
        copy = snapshot(obj)
        with self._changed:
            self._pending[path] = self._pending.get(path, 0) + 1
            self._queued += 1
        self._queue.put((copy, path, done))

    def then(self, fn: Callable[[], None]) -> None:
        self.check()
        with self._changed:
            self._queued += 1
        self._queue.put((None, None, fn))

    def check(self) -> None:
        """Raise the error of a write that failed, if one did (cheap: for every training step)."""
        if self._error is not None:
            with self._changed:
                self._raise()

    def wait(self) -> None:
        """Until every submitted file is written and every `then` has run; raises the first write
        that failed."""
        with self._changed:
            self._changed.wait_for(lambda: not self._queued or self._error is not None)
            self._raise()

    def close(self) -> None:
        """Let the writes in flight finish (errors are dropped: the run is ending on one already)."""
        self._queue.put(None)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            obj, path, done = item
            try:
                if self._error is None:
                    if path is not None:
                        save_checkpoint(obj, path)
                    if done is not None:
                        done()
            except BaseException as e:  # handed to the training thread
                with self._changed:
                    self._error = e
            finally:
                del obj
                with self._changed:
                    if path is not None:
                        self._pending[path] -= 1
                    self._queued -= 1
                    self._changed.notify_all()


def torch_file_problem(
    path: str | Path, *, what: str, noun: str, expected: str, look_for: tuple[str, ...] = ()
) -> Optional[str]:
    """Why `path` cannot be a file torch.save wrote, as a one-line message naming the file and
    `expected` (None when it may be one). Reads the first bytes only, so a text file or a folder
    is named as such instead of surfacing the unpickler's advice. `what` is the subject ("checkpoint",
    "--pretrained_weights"), `noun` what the file should be ("PyTorch checkpoint"); for a folder,
    the first of `look_for` inside it is named as the file to give."""
    path = Path(path)
    if path.is_dir():
        inside = next((path / name for name in look_for if (path / name).is_file()), None)
        fix = f"give the file inside it, {inside}" if inside else f"give {expected}, not a folder"
        return f"{what} file not found: {path} is a folder; {fix}"
    if not path.is_file():
        return f"{what} not found: {path}; give {expected}"
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot read {what} {path}: {e.strerror or type(e).__name__}"
    if not head:
        return f"cannot read {what} {path}: the file is empty (corrupt, or cut short when written); give {expected}"
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO:
        return None
    kind = "it is text, not" if _looks_like_text(head) else "its first bytes are not those of"
    return (
        f"{what} {path} is not a {noun}: {kind} a file torch.save writes (another kind of file, or a corrupt "
        f"one); give {expected}"
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the read is still text
        if e.reason != "unexpected end of data" or e.start < len(head) - 3:
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c.isspace() for c in text)


def load_torch_file(
    path: str | Path,
    *,
    what: str,
    noun: str,
    expected: str,
    look_for: tuple[str, ...] = (),
    error: type[Exception] = CheckpointError,
    map_location: str | torch.device = "cpu",
) -> Any:
    """torch.load(weights_only=True) of a file a user named. Raises `error` with one line naming
    the file, what is wrong and `expected`, never PyTorch's own text (it advises weights_only=False,
    which would run the file's code)."""
    problem = torch_file_problem(path, what=what, noun=noun, expected=expected, look_for=look_for)
    if problem:
        raise error(problem)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # (UnpicklingError, BadZipFile, RuntimeError, EOFError, IndexError, KeyError, ...); with
        # weights_only=True none of it ran code, and all of it means "not a readable file".
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower().replace("_", " "):
            raise error(
                f"cannot read {what} {path}: it holds Python objects other than tensors, which a "
                f"weights-only load refuses (loading them could run code); give {expected}"
            ) from None
        raise error(
            f"cannot read {what} {path}: it is corrupt or truncated (a PyTorch file that cannot "
            f"be read to the end); give {expected}"
        ) from None


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    what: str = "checkpoint",
    look_for: tuple[str, ...] = CHECKPOINT_FILES,
) -> dict[str, Any]:
    """Load and check a FaceID checkpoint with weights_only=True. Raises CheckpointError naming
    the file and what is wrong with it; `what` names it in those messages (e.g. "--resume
    checkpoint"), `look_for` are the files suggested when `path` is their folder."""
    path = Path(path)
    obj = load_torch_file(
        path,
        what=what,
        noun="PyTorch checkpoint",
        expected=EXPECTED_CHECKPOINT,
        look_for=look_for,
        map_location=map_location,
    )
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FaceID checkpoint (no format '{FORMAT}'); give {EXPECTED_CHECKPOINT}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {obj.get('format_version')}; "
            f"this FaceID reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete")
    return obj
