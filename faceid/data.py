"""Identity datasets (ImageFolder layout), decoding, sampling and batch transforms.

Layout: `<root>/<identity>/<image>`; one folder per person. Non-directories in the root and
non-image files are ignored. Unreadable images are skipped with a warning that counts them; a
dataset left with too few identities is an error that names the folder.

An image is decoded, centre-cropped to a square (`crop`: the fraction of the shorter side kept,
1 = all of it) or aligned onto its face, and resized to `img_size`: uint8 [3, S, S]
(`decode_image`). A dataset's images are loaded once, in memory when they fit (`cache_images`),
or decoded by DataLoader workers per batch otherwise (faceid.imagestore). Augmentation and
normalisation run on whole batches (`BatchTransform`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from faceid.errors import DataError
from faceid.faces import Face, align_face, align_scale
from faceid.images import IMAGE_EXTENSIONS, open_image, open_image_scaled
from faceid.model import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class IdentityFolder:
    """Images of a dataset root and their identity labels."""

    root: Path
    paths: list[Path]
    labels: np.ndarray  # [N] int64, index into `names`
    names: list[str]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)  # images left out: no face was found in them

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        return len(self.names)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.names))

    def subset(self, keep: np.ndarray) -> "IdentityFolder":
        """Keep images where `keep` [N] is True; relabel identities densely."""
        paths = [p for p, k in zip(self.paths, keep) if k]
        old = self.labels[keep]
        used = np.unique(old)
        remap = np.full(len(self.names), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return IdentityFolder(self.root, paths, remap[old], [self.names[i] for i in used], self.skipped, self.no_face)


def scan_folder(
    root: str | Path, *, what: str = "dataset", min_identities: int = 2, min_per_identity: int = 1
) -> IdentityFolder:
    """List `root` as an identity folder. Raises DataError naming the folder and the fix."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"{what} folder not found: {root}; give an ImageFolder root with one sub-folder of images per person"
        )
    if not root.is_dir():
        raise DataError(f"{what} path is not a folder: {root}; give an ImageFolder root")
    names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            continue
        label = len(names)
        names.append(d.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    folder = IdentityFolder(root, paths, np.asarray(labels, dtype=np.int64), names)
    if not paths:
        raise DataError(
            f"{what} folder {root} holds no images in identity sub-folders "
            f"(expected {root}/<person>/<image>.jpg; accepted: {', '.join(IMAGE_EXTENSIONS)})"
        )
    # Checked before identities under min_per_identity are dropped, so that a --val where every
    # person has one image is told exactly that (not that it holds no images).
    check_identities(folder, what=what, min_identities=min_identities, min_per_identity=min_per_identity)
    if min_per_identity > 1:
        folder = folder.subset(folder.counts()[folder.labels] >= min_per_identity)
    return folder


def check_identities(folder: IdentityFolder, *, what: str, min_identities: int, min_per_identity: int) -> None:
    # After unreadable images were dropped, count what is left as such: "has 1 identity folder"
    # of a folder with 40 would send the user looking for missing folders, not broken files.
    readable = " readable" if folder.skipped else (" usable" if folder.no_face else "")
    skipped = (
        f" ({len(folder.skipped)} unreadable image(s) were skipped; replace or remove them)" if folder.skipped else ""
    )
    if folder.no_face:
        skipped += (
            f" ({len(folder.no_face)} image(s) with no face found were left out, first "
            f"{folder.no_face[0]}; add photos where the face is visible, or train with --align none)"
        )
    if min_per_identity >= 2:
        n = int((folder.counts() >= 2).sum())
        if n < 1:
            raise DataError(
                f"{what} folder {folder.root} has no identity with 2 or more{readable} images, so "
                f"no same-person pair can be scored{skipped}; add a second image for some people"
            )
        if n < min_identities:
            raise DataError(
                f"{what} folder {folder.root} has {n} identity folder(s) with 2 or more{readable} "
                f"images{skipped}; at least {min_identities} are needed (same-person and "
                "different-person pairs are scored)"
            )
    elif folder.num_identities < min_identities:
        which = (
            "identity folder(s) with readable images"
            if folder.skipped
            else "identity folder(s) with usable images"
            if folder.no_face
            else "identity folder(s)"
        )
        raise DataError(
            f"{what} folder {folder.root} has {folder.num_identities} {which}{skipped}; "
            f"at least {min_identities} are needed (one sub-folder per person)"
        )


class NoSamePersonPairError(DataError):
    """sample_pairs found no identity with 2 or more images. The caller knows which folder and
    which option asked for pairs, and names them (faceid.cli_train: pair mode on --train)."""


# --- decoding -------------------------------------------------------------------------------

# A large JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) as long as its shorter side keeps
# this many times the pixels the crop needs; the bilinear resize then reduces it further. Against
# a full decode it changes the model's input by a fraction of a grey level and the embedding's
# cosine by under 1e-6, and reads a phone photo several times faster (bench/README.md, decode_speed).
DECODE_MARGIN = 2


def decode_side(size: int, crop: float = 1.0) -> int:
    """The shorter side a photo is decoded at, at least, for `resize_center_crop(img, size, crop)`."""
    return math.ceil(DECODE_MARGIN * size / crop)


def decode_image(
    path: Path, size: int, crop: float = 1.0, face: Optional[Face] = None, reduced_side: Optional[int] = None
) -> np.ndarray:
    """File -> uint8 [3, size, size], exactly as the Verifier prepares a photo it serves, so
    evaluation embeddings and thresholds match served ones: read by faceid.images.open_image (RGB,
    EXIF orientation applied), then with a `face` aligned onto the ArcFace template
    (faceid.faces.align_face), without one `resize_center_crop`ped (a large JPEG decoded at a
    reduced scale, down to `decode_side`). `reduced_side`: the detector's max_side, for a
    preparation with `reduced_decode` (faceid.faces.aligned_crop): a large JPEG is aligned from
    the reduced decoding that keeps its face's detail, as the server aligns it."""
    if face is not None:
        if not reduced_side:
            return align_face(open_image(path), face.landmarks, size, crop)
        cap = align_scale(face.landmarks, size, crop)
        img, scale = open_image_scaled(path, reduce_longer_to=reduced_side, max_scale=cap)
        return align_face(img, face.landmarks, size, crop, scale)
    return resize_center_crop(open_image(path, reduce_to=decode_side(size, crop)), size, crop)


def resize_center_crop(img: Image.Image, size: int, crop: float = 1.0) -> np.ndarray:
    """RGB PIL image -> uint8 [3, size, size]: shorter side resized to `size`, centre-cropped.
    With `crop` < 1 only the centred square of `crop` times the shorter side is kept, resized to
    `size` (for loosely framed faces: more of the input's pixels on the face)."""
    img = img.convert("RGB")
    w, h = img.size
    if crop < 1.0:
        side = crop * min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize(
            (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=None
        )
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# --- sampling -------------------------------------------------------------------------------


def classification_batches(
    labels: np.ndarray, batch_size: int, rng: np.random.Generator, *, balanced: bool
) -> list[np.ndarray]:
    """One epoch of image-index batches (last partial batch dropped when there is a full one).

    balanced=False: a permutation of all images. balanced=True: as many draws as images, each
    picking an identity uniformly and then one of its images, so a person with 500 photos is
    seen as often as a person with 3.
    """
    n = len(labels)
    if balanced:
        ids = np.unique(labels)
        by_id = [np.flatnonzero(labels == c) for c in ids]
        pick = rng.integers(0, len(ids), size=n)
        order = np.array([by_id[c][rng.integers(0, len(by_id[c]))] for c in pick], dtype=np.int64)
    else:
        order = rng.permutation(n)
    nb = max(1, n // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


def sample_pairs(
    labels: np.ndarray, n_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced pairs: n_pairs//2 same-identity (two distinct images), the rest different-identity.

    Returns ia [P], ib [P] image indices and y [P] (1 same, 0 different). Positive identities are
    drawn uniformly over identities with >= 2 images, so that large identities do not dominate.
    """
    labels = np.asarray(labels)
    ids, counts = np.unique(labels, return_counts=True)
    multi = ids[counts >= 2]
    if len(multi) == 0:
        raise NoSamePersonPairError(
            "no identity has 2 or more images, so no same-person pair can be drawn; add a second image for some people"
        )
    if len(ids) < 2:
        raise DataError("only one identity: no different-person pair can be drawn")
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], ids)
    cnt = dict(zip(ids.tolist(), counts.tolist()))
    start = dict(zip(ids.tolist(), starts.tolist()))
    n_pos = n_pairs // 2
    n_neg = n_pairs - n_pos
    # positives
    pid = rng.choice(multi, size=n_pos)
    c = np.array([cnt[i] for i in pid.tolist()], dtype=np.int64)
    s = np.array([start[i] for i in pid.tolist()], dtype=np.int64)
    a = rng.integers(0, c)
    b = (a + rng.integers(1, c)) % c  # distinct from a
    pa, pb = order[s + a], order[s + b]
    # negatives: two images of different identities
    na = rng.integers(0, len(labels), size=n_neg)
    nb = rng.integers(0, len(labels), size=n_neg)
    same = labels[na] == labels[nb]
    while same.any():
        nb[same] = rng.integers(0, len(labels), size=int(same.sum()))
        same = labels[na] == labels[nb]
    ia = np.concatenate([pa, na])
    ib = np.concatenate([pb, nb])
    y = np.concatenate([np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)])
    return ia, ib, y


# --- batch transforms -----------------------------------------------------------------------


class BatchTransform:
    """uint8 [B, 3, S, S] -> normalised float [B, 3, S, S] on `device`, with optional training
    augmentation (random horizontal flip; with `shift`, also a random shift of up to S/16 pixels)."""

    def __init__(self, device: torch.device, *, augment: bool, channels_last: bool, shift: bool = True) -> None:
        self.device = device
        self.augment = augment
        self.shift = shift
        self.channels_last = channels_last
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.augment:
            x = self._augment(x, generator)
        x = (x.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _augment(self, x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        b, _, s, _ = x.shape
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip.to(x.device).view(b, 1, 1, 1), x.flip(3), x)
        if not self.shift:
            return x
        p = max(1, s // 16)
        padded = torch.nn.functional.pad(x.float(), (p, p, p, p), mode="replicate").to(x.dtype)
        off = torch.randint(0, 2 * p + 1, (b, 2), generator=g)
        return shifted_windows(padded, off, s, gather=x.device.type != "cpu")


def shifted_windows(padded: torch.Tensor, off: torch.Tensor, s: int, *, gather: bool) -> torch.Tensor:
    """The s x s window of each padded image [B, C, S+2p, S+2p] at its (dy, dx) in `off` [B, 2].
    `gather`: all windows in one indexing kernel, for a GPU, where a slice per image is a kernel
    launch per image; on a CPU the slices are faster (about 40 against 55 ms for 64 images of 56 px
    on 2 cores). Both give the same tensor."""
    if not gather:
        return torch.stack([padded[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in enumerate(off.tolist())])
    off = off.to(padded.device)
    span = torch.arange(s, device=padded.device)
    rows = (off[:, 0:1] + span)[:, :, None]  # [B, s, 1]: rows dy..dy+s-1
    cols = (off[:, 1:2] + span)[:, None, :]  # [B, 1, s]: columns dx..dx+s-1
    batch = torch.arange(len(off), device=padded.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def iterate_in_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, n, batch_size):
        yield np.arange(i, min(n, i + batch_size))
