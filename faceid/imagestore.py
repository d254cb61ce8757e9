"""A dataset's images loaded for training and evaluation: each decoded once and kept in memory as
uint8 [3, S, S] when they fit (`cache_images`), or their headers checked and each batch decoded by
DataLoader workers; unreadable images, and with alignment images without a face, are left out
with a counted warning (`load_images`). `batch_images` yields the batches of an epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from faceid.data import IdentityFolder, check_identities, decode_image
from faceid.errors import DataError
from faceid.faces import DetectorSpec, Face, pick_face
from faceid.images import ACCEPTED_FORMATS

log = logging.getLogger("faceid.data")  # the loading log lines keep the name they always had


class _DecodeOne(torch.utils.data.Dataset):
    def __init__(
        self,
        paths: Sequence[Path],
        size: int,
        crop: float,
        faces: Optional[Sequence[Optional[Face]]] = None,
        reduced_side: Optional[int] = None,
    ) -> None:
        self.paths, self.size, self.crop, self.reduced_side = paths, size, crop, reduced_side
        self.faces = faces if faces is not None else [None] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.paths[i], self.size, self.crop, self.faces[i], self.reduced_side)
            return i, torch.from_numpy(img), ""
        except Exception as e:  # unreadable file: reported and skipped by the caller
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(e).__name__}: {e}"


def _collate(items):
    idx = torch.tensor([i for i, _, _ in items])
    imgs = torch.stack([t for _, t, _ in items])
    errs = [e for _, _, e in items]
    return idx, imgs, errs


def decode_all(
    paths: Sequence[Path],
    size: int,
    workers: int,
    crop: float = 1.0,
    faces: Optional[Sequence[Optional[Face]]] = None,
    reduced_side: Optional[int] = None,
) -> tuple[torch.Tensor, list[str]]:
    """Decode every file once (aligned where `faces` gives its face; `reduced_side` as
    faceid.data.decode_image). Returns uint8 [N, 3, S, S] and one error string per file ('' = ok)."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    errors = [""] * len(paths)
    loader = torch.utils.data.DataLoader(
        _DecodeOne(paths, size, crop, faces, reduced_side), batch_size=64, num_workers=workers, collate_fn=_collate
    )
    for idx, imgs, errs in loader:
        out[idx] = imgs
        for i, e in zip(idx.tolist(), errs):
            errors[i] = e
    return out, errors


class ImageStore:
    """uint8 images of an IdentityFolder, by index: `batch(indices) -> [B, 3, S, S]`."""

    def __init__(
        self,
        folder: IdentityFolder,
        size: int,
        cached: Optional[torch.Tensor],
        crop: float = 1.0,
        faces: Optional[Sequence[Optional[Face]]] = None,
        reduced_side: Optional[int] = None,
    ) -> None:
        self.folder, self.size, self.cached, self.crop = folder, size, cached, crop
        self.faces = list(faces) if faces is not None else [None] * len(folder)
        self.reduced_side = reduced_side

    def batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if self.cached is not None:
            return self.cached.index_select(0, idx)
        arrs = []
        for i in idx.tolist():
            try:
                img = decode_image(self.folder.paths[i], self.size, self.crop, self.faces[i], self.reduced_side)
                arrs.append(torch.from_numpy(img))
            except Exception as e:  # became unreadable after the scan
                log.warning("unreadable image skipped in batch (black image used): %s: %s", self.folder.paths[i], e)
                arrs.append(torch.zeros(3, self.size, self.size, dtype=torch.uint8))
        return torch.stack(arrs)


def load_images(
    folder: IdentityFolder,
    size: int,
    *,
    workers: int,
    crop: float = 1.0,
    cache: str = "auto",
    cache_max_gb: float = 4.0,
    what: str = "dataset",
    min_identities: int = 2,
    min_per_identity: int = 1,
    align: str = "none",
    detector: Optional[DetectorSpec] = None,
    device: str | torch.device = "cpu",
    no_face: str = "drop",
    progress: Optional[Callable[[int, int], None]] = None,
    reduced_decode: bool = False,
) -> tuple[IdentityFolder, ImageStore]:
    """Decode (or check) every image once; drop unreadable ones with a counted warning.

    With `align` "arcface" each image's faces are found first (faceid.facecache: detected once,
    then cached) and the largest is aligned. An image with no face is left out (`no_face` "drop",
    listed in the returned folder's `no_face`) or, with "center", prepared as an unaligned image
    (a pairs protocol keeps all its pairs). `reduced_decode` (faceid.faces.Preparation): a large
    JPEG is aligned from a reduced decoding that keeps its face's detail.

    Returns the folder without the skipped files and a store over it."""
    faces: Optional[list[Optional[Face]]] = None
    reduced_side = (detector or DetectorSpec()).max_side if align != "none" and reduced_decode else None
    if align != "none":
        folder, faces = _folder_faces(
            folder,
            detector or DetectorSpec(),
            workers=workers,
            device=device,
            what=what,
            no_face=no_face,
            progress=progress,
        )
        if no_face == "drop":
            check_identities(folder, what=what, min_identities=min_identities, min_per_identity=min_per_identity)
    nbytes = len(folder) * 3 * size * size
    use_cache = cache == "on" or (cache == "auto" and nbytes <= cache_max_gb * 1e9)
    if use_cache:
        images, errors = decode_all(folder.paths, size, workers, crop, faces, reduced_side)
    else:
        images, errors = None, _check_headers(folder.paths, workers)
    bad = np.array([bool(e) for e in errors])
    if bad.any():
        skipped = [(folder.paths[i], errors[i]) for i in np.flatnonzero(bad)]
        first = "; ".join(f"{p}: {e}" for p, e in skipped[:3])
        log.warning(
            "%s: skipped %d unreadable image(s) of %d (training goes on without them): %s",
            what,
            len(skipped),
            len(folder),
            first,
        )
        keep = ~bad
        folder = folder.subset(keep)
        folder.skipped = skipped
        if faces is not None:
            faces = [f for f, k in zip(faces, keep) if k]
        if images is not None:
            images = images[torch.from_numpy(keep)]
        if len(folder) == 0:
            raise DataError(
                f"{what} folder {folder.root}: none of the images could be read "
                f"(first: {first}); check the files are images ({ACCEPTED_FORMATS})"
            )
        check_identities(folder, what=what, min_identities=min_identities, min_per_identity=min_per_identity)
    return folder, ImageStore(folder, size, images, crop, faces, reduced_side)


def _folder_faces(
    folder: IdentityFolder,
    spec: DetectorSpec,
    *,
    workers: int,
    device: str | torch.device,
    what: str,
    no_face: str,
    progress: Optional[Callable[[int, int], None]],
) -> tuple[IdentityFolder, list[Optional[Face]]]:
    """The face each image is aligned by (the largest found), with images without one dropped or
    kept unaligned as `no_face` says. Unreadable images stay in, to be reported as such."""
    from faceid.facecache import find_faces

    found = find_faces(folder.paths, spec, workers=workers, device=device, progress=progress, what=what)
    missing = [i for i, f in enumerate(found) if f is not None and not f]
    faces = [pick_face(f) if f else None for f in found]
    if not missing:
        return folder, faces
    listed = [folder.paths[i] for i in missing]
    examples = ", ".join(str(p) for p in listed[:3])
    if no_face != "drop":
        log.warning(
            "%s: no face found in %d of %d images; they are used unaligned (first: %s)",
            what,
            len(listed),
            len(folder),
            examples,
        )
        folder.no_face = listed
        return folder, faces
    if len(listed) == len(folder):
        raise DataError(
            f"{what} folder {folder.root}: no face was found in any of its {len(folder)} images "
            f"(first: {examples}); give photos of faces, or --align none for images the "
            "detector cannot read (already cropped and aligned faces, drawings)"
        )
    log.warning(
        "%s: no face found in %d of %d images; training goes on without them (first: %s)",
        what,
        len(listed),
        len(folder),
        examples,
    )
    keep = np.ones(len(folder), dtype=bool)
    keep[missing] = False
    kept = folder.subset(keep)
    kept.no_face = listed
    return kept, [f for f, k in zip(faces, keep) if k]


def _check_one(path: Path) -> str:
    try:
        with Image.open(path) as img:
            img.verify()
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {e}"


class _CheckOne(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> str:
        return _check_one(self.paths[i])


def _check_headers(paths: Sequence[Path], workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(_CheckOne(paths), batch_size=256, num_workers=workers, collate_fn=list)
    return [e for batch in loader for e in batch]


# --- batches of an epoch ------------------------------------------------------------------------


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, store: ImageStore, batches: Sequence[np.ndarray]) -> None:
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.batch(self.batches[i])


def batch_images(
    store: ImageStore, batches: Sequence[np.ndarray], *, workers: int, pin_memory: bool = False
) -> Iterator[torch.Tensor]:
    """uint8 image batches for `batches` of indices, in order. From memory when the store is
    cached; otherwise decoded ahead by `workers` DataLoader processes."""
    if store.cached is not None or workers == 0:
        for b in batches:
            yield store.batch(b)
        return
    loader = torch.utils.data.DataLoader(
        _BatchDataset(store, batches), batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=2
    )
    yield from loader
