"""Verifier: a loaded checkpoint that embeds images and verifies pairs with its learned threshold."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from faceid.checkpoint import load_checkpoint
from faceid.data import BatchTransform, decode_side, resize_center_crop
from faceid.errors import CheckpointError, ConfigError, ImageError
from faceid.evaluate import autocast_ctx
from faceid.faces import (
    DetectorSpec,
    Face,
    FaceDetector,
    NoFaceError,
    Photo,
    Preparation,
    aligned_crop,
    build_detector,
    pick_face,
    search_spec,
    shrink_for_detection,
    smallest_face_percent,
)
from faceid.model import NECKS, EmbeddingNet
from faceid.runtime import ONE_THREAD_MAX_IMAGES, compute_threads, resolve_amp, resolve_device

log = logging.getLogger(__name__)

THRESHOLD_NAMES = ("acc", "far_1e-2", "far_1e-3")
COMPILE_MODES = ("off", "freeze", "cudagraph")
Threshold = Union[None, str, float]


@dataclass(frozen=True)
class Prepared:
    """An image ready for the network (uint8 [3, S, S]) and, for an aligned model that detected,
    the face it shows and how many faces the photo held."""

    tensor: torch.Tensor
    face: Optional[Face] = None
    faces_found: Optional[int] = None

    def face_json(self) -> Optional[dict[str, Any]]:
        if self.face is None:
            return None
        return {**self.face.to_json(), "faces_found": self.faces_found}


class Pending:
    """A photo decoded for a model trained on aligned faces, its face still to be found: what a
    server's decoding threads hand the embedding worker, which finds the faces of every pending
    photo in a batch with one detector call (`Verifier.prepare_pending`) and keeps the result in
    `prepared`. The decoding thread has already shrunk the photo for detection (`small`, and
    `factor` back to the full-size photo's pixels), so the worker never resizes a large photo.
    `field` names the upload in a NoFaceError; `detector`, where set, is a finer search than the
    model's own (`Verifier.detector_for`)."""

    __slots__ = ("photo", "small", "factor", "field", "prepared", "detector")

    def __init__(
        self,
        photo: Photo,
        small: Image.Image,
        factor: float,
        field: Optional[str] = None,
        detector: Optional[FaceDetector] = None,
    ) -> None:
        self.photo, self.small, self.factor, self.field, self.detector = photo, small, factor, field, detector
        self.prepared: Optional[Prepared] = None

    @property
    def tensor(self) -> torch.Tensor:
        if self.prepared is None:
            raise RuntimeError("this photo's face has not been found yet (Verifier.prepare_pending)")
        return self.prepared.tensor

    def face_json(self) -> Optional[dict[str, Any]]:
        return self.prepared.face_json() if self.prepared is not None else None


def to_uint8_tensor(img: Image.Image, size: int, crop: float = 1.0) -> torch.Tensor:
    """PIL image -> uint8 [3, size, size]: RGB, centre-cropped (`crop` of the shorter side) and
    resized (the same function as training and evaluation use, faceid.data.decode_image)."""
    return torch.from_numpy(resize_center_crop(img, size, crop))


class Verifier:
    """Embeds images with a checkpoint's network; thread-safe (one forward at a time)."""

    def __init__(
        self,
        ckpt: dict[str, Any],
        path: Optional[str] = None,
        device: str = "auto",
        amp: str = "auto",
        compile: str = "off",
    ) -> None:
        if compile not in COMPILE_MODES:
            raise ConfigError(f"compile={compile!r}: use one of {', '.join(COMPILE_MODES)}")
        self.path = path
        self.device = resolve_device(device)
        if compile == "cudagraph" and self.device.type != "cuda":
            raise ConfigError(
                "compile=cudagraph replays recorded GPU kernel launches and needs a CUDA GPU; "
                "use compile off (or freeze) on a CPU"
            )
        self.amp_dtype = resolve_amp(amp, self.device)
        try:
            self.img_size = int(ckpt["img_size"])
            self.crop = float(ckpt.get("crop", 1.0))  # checkpoints from before the option: 1
            if not 0.0 < self.crop <= 1.0:
                raise ValueError(f"crop {self.crop} is outside (0, 1]")
            self.preparation = Preparation.from_checkpoint(ckpt)
            self.embedding_size = int(ckpt["embedding_size"])
            self.epoch = int(ckpt["epoch"])
            self.metrics = dict(ckpt["metrics"])
            self.thresholds = {k: float(v) for k, v in ckpt["thresholds"].items()}
            self.config = dict(ckpt["config"])
            self.flip = bool(self.config.get("eval_flip", False))
            not_finite = [
                k
                for k, v in ckpt["model"].items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"checkpoint {path} is malformed ({type(e).__name__}: {str(e)[:200]}); "
                "give a backbone_best.pt or last.pt written by faceid train"
            ) from None
        if not_finite:  # it would answer every request with NaN similarities
            raise CheckpointError(
                f"checkpoint {path} holds weights that are not finite (NaN or infinity, "
                f"{len(not_finite)} tensors, first {not_finite[0]}); it comes from a "
                "diverged run: use an earlier checkpoint"
            )
        neck = self.config.get("neck", "gap")  # checkpoints from before the option: gap
        if neck not in NECKS:
            raise CheckpointError(f"checkpoint {path} names neck {neck!r}; this FaceID knows {', '.join(NECKS)}")
        # The trained network (its trunk faceid.model.resnet50_trunk) with the checkpoint's weights
        self.model = EmbeddingNet(self.embedding_size, neck=neck, img_size=self.img_size)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit the ResNet-50 embedding network: {str(e).splitlines()[0]}"
            ) from None
        self.model.to(self.device).eval()
        self.channels_last = bool(self.config.get("channels_last", True))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.transform = BatchTransform(self.device, augment=False, channels_last=self.channels_last)
        # An aligned model finds the face in each photo with the detector its training data was
        # prepared with, on the model's device
        self.detector = build_detector(self.preparation.detector, self.device) if self.preparation.aligned else None
        self._lock = threading.Lock()
        # True: forward passes may run at once from several threads (a server's inference
        # workers), each on the compute threads torch is set to; False: one at a time, batches of
        # up to ONE_THREAD_MAX_IMAGES images on one thread.
        self.concurrent = False
        # compile="freeze": torch.compile with inductor's freezing (weights become constants: batch
        # norm folds into the convolutions, weights are packed once instead of on every call; see
        # bench/compile_speed.py). Shapes are static, so batches are padded to a power of two and
        # warmup() compiles each size up front.
        # compile="cudagraph" (CUDA only): each padded batch size's forward pass is recorded once as a
        # CUDA graph and replayed, so a small batch costs one launch instead of one per kernel.
        self.compile = compile
        self._forward = torch.compile(self.model, dynamic=False) if compile == "freeze" else self.model
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", amp: str = "auto", compile: str = "off"
    ) -> "Verifier":
        return cls(load_checkpoint(path), str(path), device=device, amp=amp, compile=compile)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.compile == "off":
            return self.model(x).float()
        n = len(x)
        padded = 1 << max(0, n - 1).bit_length()
        if self.compile == "cudagraph":
            return self._replay(x, padded)
        import torch._inductor.config as inductor_config  # freeze only: no inductor for graphs

        if padded > n:
            x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with inductor_config.patch(freezing=True):
            return self._forward(x).float()[:n]

    def _autocast_uncached(self):
        # A graph must not capture autocast's cache of cast weights (PyTorch's CUDA graph notes).
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _replay(self, x: torch.Tensor, padded: int) -> torch.Tensor:
        """The forward pass of `x` through the CUDA graph of its padded batch size, recorded on first
        use (warmup() records every size the server can form). Rows past len(x) hold whatever the
        last batch left there; in eval mode each row's output depends on that row alone."""
        entry = self._graphs.get(padded)
        if entry is None:
            static_in = torch.zeros((padded, *x.shape[1:]), dtype=x.dtype, device=self.device)
            if self.channels_last:
                static_in = static_in.contiguous(memory_format=torch.channels_last)
            side = torch.cuda.Stream(self.device)  # cuDNN's first calls of each shape, off the graph
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self._autocast_uncached():
                for _ in range(2):
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._autocast_uncached():
                static_out = self.model(static_in).float()
            entry = self._graphs[padded] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in[: len(x)].copy_(x)
        graph.replay()
        return static_out[: len(x)].clone()  # the next replay overwrites static_out

    @torch.inference_mode()
    def warmup(self, max_images: int) -> int:
        """Run every padded batch size up to `max_images` images once (compile="freeze" compiles
        each, compile="cudagraph" records each); returns how many sizes ran."""
        views = 2 if self.flip else 1
        sizes = sorted({1 << max(0, b * views - 1).bit_length() for b in range(1, max(1, max_images) + 1)})
        x = torch.zeros(1, 3, self.img_size, self.img_size, dtype=torch.uint8)
        with self._lock:
            for s in sizes:
                with autocast_ctx(self.device, self.amp_dtype):
                    self._run(self.transform(x.expand(s, -1, -1, -1).contiguous()))
        return len(sizes)

    @property
    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.path,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "img_size": self.img_size,
            "crop": self.crop,
            "embedding_size": self.embedding_size,
            "arch": "resnet50",
            "train_mode": self.config.get("train_mode"),
            "config": self.config,
            "faces": self.preparation.to_json(),
        }

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 [B, 3, S, S] -> float32 [B, D] unit-norm embeddings. On a CPU, batches of up to
        ONE_THREAD_MAX_IMAGES images run on one compute thread (see there)."""
        lock: ContextManager[Any]
        if self.concurrent:
            lock, threads = contextlib.nullcontext(), None
        else:
            lock = self._lock
            threads = 1 if self.device.type == "cpu" and len(batch) <= ONE_THREAD_MAX_IMAGES else None
        with lock, compute_threads(threads):
            x = self.transform(batch)
            with autocast_ctx(self.device, self.amp_dtype):
                if self.flip:  # both views in one pass: at batch 1-2 clearly faster than two passes
                    both = self._run(torch.cat([x, x.flip(3)]))
                    e = both[: len(x)] + both[len(x) :]
                else:
                    e = self._run(x)
            return torch.nn.functional.normalize(e, dim=1).cpu().numpy()

    @property
    def aligned(self) -> bool:
        return self.detector is not None

    @property
    def decode_side(self) -> Optional[int]:
        """The shorter side a JPEG is decoded at, at least, before resizing for this model (the
        `reduce_to` of faceid.images.open_image; training and evaluation decode the same way).
        None for an aligned model: the face is warped from the full-size photo."""
        return None if self.aligned else decode_side(self.img_size, self.crop)

    def open(self, source: Any, **kwargs: Any) -> Image.Image:
        """An image file or upload's bytes, decoded as this model's training and evaluation
        decoded theirs (faceid.images.open_image with `reduce_to=decode_side`); full size for an
        aligned model (`open_photo` reads a photo whose face is to be found as training did)."""
        from faceid.images import open_image

        return open_image(source, reduce_to=self.decode_side, **kwargs)

    def open_photo(self, source: Any, spec: Optional[DetectorSpec] = None, **kwargs: Any) -> Photo:
        """A photo file or upload's bytes, for an aligned model to find and align its face exactly
        as its training data was (faceid.faces.Photo: a large JPEG decoded at a reduced scale for
        detection, and for alignment at the scale its face needs; full size for a checkpoint
        recorded before `reduced_decode`, as it was always served). `spec`: a finer search than
        the model's (`detector_for`). `kwargs`: open_image's."""
        prep = self.preparation
        return Photo.open(source, (spec or prep.detector).max_side if prep.reduced_decode else 0, **kwargs)

    def detector_for(self, smallest_percent: Optional[float]) -> Optional[FaceDetector]:
        """The detector that finds faces down to `smallest_percent` of a photo's longer side
        (faceid.faces.search_spec; None: the model's own), on the model's device; None for a model
        without alignment. Open the photo with `read(..., detector=detector)`."""
        if self.detector is None:
            return None
        spec = search_spec(self.preparation.detector, smallest_percent)
        return self.detector if spec == self.detector.spec else build_detector(spec, self.device)

    def read(
        self, source: Any, detect: bool = True, detector: Optional[FaceDetector] = None, **kwargs: Any
    ) -> Union[Image.Image, Photo]:
        """What `prepare_face(..., detect, detector)` takes for a file or upload: `open_photo` (for
        `detector`'s spec where given) where a face is to be found, `open` otherwise."""
        if self.aligned and detect:
            return self.open_photo(source, spec=detector.spec if detector is not None else None, **kwargs)
        return self.open(source, **kwargs)

    def prepare_face(
        self, img: Union[Image.Image, Photo], detect: bool = True, detector: Optional[FaceDetector] = None
    ) -> Prepared:
        """PIL image or Photo -> what `embed` takes for it, and the face it was made from. An aligned
        model detects the faces (with `detector` where given: `detector_for`) and aligns the largest
        (NoFaceError when there is none); with `detect` False the image is taken to be an aligned
        face crop already, and only resized. A model trained without alignment resizes and
        centre-crops (`crop`)."""
        if self.detector is None or not detect:
            image = img.at(1) if isinstance(img, Photo) else img
            return Prepared(to_uint8_tensor(image, self.img_size, self.crop))
        photo = img if isinstance(img, Photo) else Photo(img)
        detector = detector or self.detector
        return self._aligned(photo, photo.faces(detector), detector.spec)

    def pending(
        self, img: Union[Image.Image, Photo], field: Optional[str] = None, detector: Optional[FaceDetector] = None
    ) -> Pending:
        """A photo made ready for `prepare_pending` (shrunk for detection, as `detect` would), its
        faces to be found by `detector` where given (`detector_for`), else by the model's own."""
        photo = img if isinstance(img, Photo) else Photo(img)
        spec = detector.spec if detector is not None else self.preparation.detector
        small, factor = shrink_for_detection(photo.image, spec)
        return Pending(photo, small, factor * photo.scale, field, detector)

    def prepare_pending(self, items: Sequence[Any]) -> list[Optional[ImageError]]:
        """Find the faces of every `Pending` photo among `items` with one detector call (batched,
        on the model's device; one per detector where some ask for a finer search) and align each
        one's largest face into its `prepared`. Per item:
        None, or the ImageError (its `field` set) that fails only that photo: a NoFaceError for a
        photo without a face, or its finer decoding failing. Other items are left as they are."""
        todo = [(i, p) for i, p in enumerate(items) if isinstance(p, Pending) and p.prepared is None]
        errors: list[Optional[ImageError]] = [None] * len(items)
        if not todo:
            return errors
        if self.detector is None:
            for _, p in todo:
                p.prepared = Prepared(to_uint8_tensor(p.photo.at(1), self.img_size, self.crop))
            return errors
        groups: dict[int, list[tuple[int, Pending]]] = {}
        for i, p in todo:
            groups.setdefault(id(p.detector or self.detector), []).append((i, p))
        for group in groups.values():
            detector = group[0][1].detector or self.detector
            found = detector.detect([p.small for _, p in group])
            for (i, p), faces in zip(group, found):
                try:
                    p.prepared = self._aligned(p.photo, [f.scaled(p.factor) for f in faces], detector.spec)
                except ImageError as e:  # NoFaceError, or a finer decoding (Photo.at) that failed
                    e.field = p.field
                    errors[i] = e
        return errors

    def no_face(self, photo: Photo, spec: Optional[DetectorSpec] = None) -> NoFaceError:
        """The error for `photo`, in which a detector of `spec` (default: the model's own) found no
        face: what to send instead."""
        w, h = photo.full_size
        if spec is not None and spec != self.preparation.detector:
            return NoFaceError(
                f"no face found in the {w}x{h} image, searching faces down to "
                f"{smallest_face_percent(spec):.1f}% of its longer side"
            )
        return NoFaceError(
            f"no face found in the {w}x{h} image; send a photo where a face is visible and "
            f"at least {smallest_face_percent(self.preparation.detector):.0f}% of the photo's longer side "
            "across (in a group photo, crop around the person or look for smaller faces with "
            "min_face), or, if it is already an aligned face crop, set detect=false"
        )

    def _aligned(self, photo: Photo, faces: Sequence[Face], spec: Optional[DetectorSpec] = None) -> Prepared:
        """The largest of `faces` (found in `photo`, in its full-size pixels, by a detector of
        `spec`, by default the model's) aligned as this model's training aligned them."""
        face = pick_face(faces)
        if face is None:
            raise self.no_face(photo, spec)
        prep = self.preparation
        crop = aligned_crop(photo, face, self.img_size, self.crop, prep.reduced_decode)
        return Prepared(torch.from_numpy(crop), face, len(faces))

    def prepare(self, img: Union[Image.Image, Photo]) -> torch.Tensor:
        """PIL image -> the uint8 [3, S, S] tensor `embed` takes for it (`prepare_face`)."""
        return self.prepare_face(img).tensor

    def embed(self, images: Sequence[Union[Image.Image, Photo, torch.Tensor]]) -> np.ndarray:
        """PIL images, Photos, tensors from `prepare`, `Prepared` or `Pending` photos -> float32 [N,
        D], unit norm. Open files with `read` to read them exactly as training and evaluation did (a
        large JPEG opened with plain PIL is decoded at full scale: the same face, within a fraction
        of a grey level)."""
        if not images:
            return np.zeros((0, self.embedding_size), np.float32)
        errors = [e for e in self.prepare_pending(images) if e is not None]
        if errors:
            raise errors[0]
        return self.embed_tensors(
            torch.stack(
                [
                    im if isinstance(im, torch.Tensor) else im.tensor if hasattr(im, "tensor") else self.prepare(im)
                    for im in images
                ]
            )
        )

    def resolve_threshold(self, threshold: Threshold) -> tuple[float, str]:
        if threshold is None:
            threshold = "acc"
        if isinstance(threshold, str):
            if threshold not in self.thresholds:
                raise ConfigError(
                    f"unknown threshold {threshold!r}; use a cosine value in [-1, 1] or "
                    f"one of {', '.join(sorted(self.thresholds))}"
                )
            return self.thresholds[threshold], threshold
        t = float(threshold)
        if not (-1.0 <= t <= 1.0):
            raise ConfigError(
                f"threshold {t} is outside [-1, 1]; give a cosine value or a named "
                f"operating point ({', '.join(sorted(self.thresholds))})"
            )
        return t, "custom"

    def compare(self, e1: np.ndarray, e2: np.ndarray, threshold: Threshold = None) -> dict[str, Any]:
        th, name = self.resolve_threshold(threshold)
        sim = float(np.clip(np.dot(e1, e2), -1.0, 1.0))
        return {"similarity": sim, "threshold": th, "threshold_name": name, "match": sim >= th}

    def verify(self, img1: Image.Image, img2: Image.Image, threshold: Threshold = None) -> dict[str, Any]:
        self.resolve_threshold(threshold)  # fail before the forward pass
        e = self.embed([img1, img2])
        return self.compare(e[0], e[1], threshold)
