"""The LFW `pairs.txt` protocol: which image pairs to compare, their labels and their folds.

Format (fields separated by tabs or spaces):

    10  300                 header "F N": F folds of N matched then N mismatched pairs
    Abel_Pacheco  1  4      matched pair: name idx1 idx2
    ...
    Abdel_Madi_Shabneh  1  Dean_Barker  1      mismatched pair: name1 idx1 name2 idx2

A one-number header "N" (pairsDevTrain.txt / pairsDevTest.txt) is one fold of N matched then N
mismatched pairs. Image `idx` of `name` is `<root>/<name>/<name>_<idx:04d>.<ext>`, with ext one of
faceid.images.IMAGE_EXTENSIONS (jpg preferred when several exist).

Given with a --val folder (`faceid train`, `faceid evaluate`), a relative pairs file that does not
exist is taken relative to --val, and its images live beside it (LFW layout) or under --val
(`resolve_pairs_file`, `load_protocol`). The service resolves a job's pairs_file against its data
root instead (app/paths.py) and hands the trainer an absolute path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from faceid.errors import DataError
from faceid.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "PairsProtocol", "identities_in", "load_pairs", "load_protocol", "resolve_pairs_file"]

_FORMAT_HINT = (
    "expected LFW pairs.txt format: a header 'N' or 'FOLDS N', then per fold N lines "
    "'name idx1 idx2' (matched) followed by N lines 'name1 idx1 name2 idx2' (mismatched)"
)


@dataclass
class PairsProtocol:
    """A parsed pairs file.

    paths_a, paths_b: [P] image paths of each pair; labels: [P] int64, 1 same / 0 different;
    folds: [P] int64, the 1-based fold of each pair; source: the pairs file; n_folds: the folds
    the file declares (some may have been left out by `load_pairs(folds=...)`).
    """

    paths_a: list[Path]
    paths_b: list[Path]
    labels: np.ndarray
    folds: np.ndarray
    source: Optional[Path] = None
    n_folds: int = 1

    def __len__(self) -> int:
        return len(self.paths_a)

    def unique_paths(self) -> list[Path]:
        """Every image once, in order of first use (pair by pair, a before b): [U] paths."""
        return list(dict.fromkeys(p for pair in zip(self.paths_a, self.paths_b) for p in pair))

    def index_pairs(self, path_to_index: dict[Path, int]) -> tuple[np.ndarray, np.ndarray]:
        """Map both sides of every pair to row indices of an embedding matrix.

        path_to_index: image path -> row, e.g. `{p: i for i, p in enumerate(unique_paths())}`.
        Returns (ia, ib), each [P] int64, so that `emb[ia]` and `emb[ib]` line up with `labels`.
        """
        try:
            ia = np.fromiter((path_to_index[p] for p in self.paths_a), np.int64, len(self))
            ib = np.fromiter((path_to_index[p] for p in self.paths_b), np.int64, len(self))
        except KeyError as exc:
            raise ValueError(f"no embedding index for image {exc.args[0]}") from None
        return ia, ib


def identities_in(protocol: PairsProtocol) -> set[str]:
    """The identity names a protocol uses, e.g. to keep them out of a training set."""
    return {p.parent.name for p in protocol.paths_a} | {p.parent.name for p in protocol.paths_b}


# ----------------------------------------------------------------------------------------------
# Parsing


def _parse_int(token: str, what: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise DataError(f"{where}: {what} must be a whole number, got {token!r}; {_FORMAT_HINT}") from None
    return value


def _parse_header(line: str, where: str) -> tuple[int, int]:
    tokens = line.split()
    if len(tokens) not in (1, 2):
        raise DataError(f"{where}: bad header {line.strip()!r}; {_FORMAT_HINT} (e.g. '10\\t300' or '1100')")
    numbers = [_parse_int(t, "the header", where) for t in tokens]
    n_folds, n = (1, numbers[0]) if len(numbers) == 1 else (numbers[0], numbers[1])
    if n_folds < 1 or n < 1:
        raise DataError(f"{where}: header {line.strip()!r} must hold positive numbers; {_FORMAT_HINT}")
    return n_folds, n


def _parse_pair(line: str, matched: bool, fold: int, n: int, where: str) -> tuple[str, int, str, int]:
    """One body line -> (name_a, idx_a, name_b, idx_b)."""
    tokens = line.split()
    want = 3 if matched else 4
    if len(tokens) != want:
        kind = "matched pair 'name idx1 idx2'" if matched else "mismatched pair 'name1 idx1 name2 idx2'"
        raise DataError(
            f"{where}: expected a {kind} (fold {fold} holds {n} matched then {n} mismatched "
            f"pairs), got {len(tokens)} fields in {line.strip()!r}"
        )
    if matched:
        name, i1, i2 = tokens
        pair = (name, _parse_int(i1, "idx1", where), name, _parse_int(i2, "idx2", where))
    else:
        n1, i1, n2, i2 = tokens
        pair = (n1, _parse_int(i1, "idx1", where), n2, _parse_int(i2, "idx2", where))
    if pair[1] < 0 or pair[3] < 0:
        raise DataError(f"{where}: image numbers must not be negative in {line.strip()!r}")
    return pair


class _ImageFinder:
    """Resolves (name, idx) to an existing file, listing each identity folder once."""

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, dict[str, str]] = {}

    def _listing(self, name: str) -> dict[str, str]:
        """stem -> file name of the preferred image extension, for one identity folder."""
        if name not in self._dirs:
            files: dict[str, str] = {}
            try:
                entries = os.listdir(self.root / name)
            except OSError:
                entries = []
            rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
            best: dict[str, int] = {}
            for entry in entries:
                stem, ext = os.path.splitext(entry)
                r = rank.get(ext.lower())
                if r is not None and r < best.get(stem, len(rank)):
                    best[stem] = r
                    files[stem] = entry
            self._dirs[name] = files
        return self._dirs[name]

    def find(self, name: str, idx: int) -> Optional[Path]:
        stem = f"{name}_{idx:04d}"
        found = self._listing(name).get(stem)
        return None if found is None else self.root / name / found


def load_pairs(
    path: Union[str, os.PathLike],
    root: Optional[Union[str, os.PathLike]] = None,
    folds: Optional[Iterable[int]] = None,
) -> PairsProtocol:
    """Read a pairs file and find its images.

    path: the pairs file; root: the folder with one sub-folder per identity (default: the pairs
    file's folder); folds: 1-based fold numbers to keep (default: all).
    Raises DataError naming the file, the line and the fix for a bad header or line, a fold out
    of range, or image files that do not exist.
    """
    path = Path(path)
    root = path.parent if root is None else Path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"pairs file {path} does not exist; give the path of an LFW-style pairs.txt") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read pairs file {path}: {exc}") from None

    # (line number, text) of the non-blank lines.
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise DataError(f"pairs file {path} is empty; {_FORMAT_HINT}")
    n_folds, n = _parse_header(lines[0][1], f"{path}, line {lines[0][0]}")
    body = lines[1:]
    expected = n_folds * 2 * n
    if len(body) != expected:
        raise DataError(
            f"{path}: the header says {n_folds} fold(s) of {n} matched + {n} mismatched pairs = "
            f"{expected} lines, but the file has {len(body)} pair lines; fix the header or the "
            "lines"
        )

    keep: Optional[set[int]] = None
    if folds is not None:
        keep = set()
        for f in folds:
            if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 1 <= f <= n_folds:
                raise DataError(f"{path}: fold {f!r} is out of range; this file has folds 1..{n_folds}")
            keep.add(int(f))
        if not keep:
            raise DataError(f"{path}: no folds selected; choose among 1..{n_folds}")

    finder = _ImageFinder(root)
    paths_a: list[Path] = []
    paths_b: list[Path] = []
    labels: list[int] = []
    fold_of: list[int] = []
    missing: dict[str, int] = {}  # image path (without extension) -> first line using it
    for k, (lineno, line) in enumerate(body):
        fold = k // (2 * n) + 1
        matched = k % (2 * n) < n
        where = f"{path}, line {lineno}"
        name_a, idx_a, name_b, idx_b = _parse_pair(line, matched, fold, n, where)
        if keep is not None and fold not in keep:
            continue
        path_a = finder.find(name_a, idx_a)
        path_b = finder.find(name_b, idx_b)
        for name, idx, p in ((name_a, idx_a, path_a), (name_b, idx_b, path_b)):
            if p is None:
                missing.setdefault(str(root / name / f"{name}_{idx:04d}"), lineno)
        if path_a is None or path_b is None:
            continue  # refused below, with every other missing image
        paths_a.append(path_a)
        paths_b.append(path_b)
        labels.append(1 if matched else 0)
        fold_of.append(fold)

    if missing:
        shown = "; ".join(f"line {ln}: {p}.jpg" for p, ln in list(missing.items())[:3])
        raise DataError(
            f"{path}: {len(missing)} image file(s) named in the pairs file are missing under "
            f"{root} (looked for {', '.join(IMAGE_EXTENSIONS)}), e.g. {shown}; point root at the "
            "folder holding one sub-folder per identity"
        )
    logger.debug("loaded %d pairs (%d folds kept of %d) from %s", len(labels), len(set(fold_of)), n_folds, path)
    return PairsProtocol(
        paths_a=paths_a,
        paths_b=paths_b,
        labels=np.asarray(labels, dtype=np.int64),
        folds=np.asarray(fold_of, dtype=np.int64),
        source=path,
        n_folds=n_folds,
    )


def resolve_pairs_file(pairs_file: Union[str, os.PathLike], val: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The pairs file as given, or, when it is relative and does not exist, relative to `val`."""
    path = Path(pairs_file)
    if val is not None and not path.is_absolute() and not path.exists():
        path = Path(val) / path
    return path


def load_protocol(
    pairs_file: Union[str, os.PathLike],
    val: Optional[Union[str, os.PathLike]] = None,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    folds: Optional[Iterable[int]] = None,
) -> PairsProtocol:
    """`load_pairs` of the pairs file `resolve_pairs_file` finds, with its images under `root`
    when given; else beside the pairs file (LFW layout) or, where they are not, under `val`.
    Raises the DataError of the last place looked in."""
    path = resolve_pairs_file(pairs_file, val)
    try:
        return load_pairs(path, root=root, folds=folds)
    except DataError:
        if root is not None or val is None or path.parent.resolve() == Path(val).resolve():
            raise
        return load_pairs(path, root=val, folds=folds)
