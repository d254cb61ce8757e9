"""Faces in photos: a detector that finds each face with five landmarks, and the alignment that
maps those landmarks onto the ArcFace template.

- `Face`: a box, five landmarks (left eye, right eye, nose tip, left and right mouth corner, left
  and right as seen in the image) and a detection score, in the photo's pixel coordinates.
- `FaceDetector`: the one small interface a detector implements (`detect(images)`); `MTCNNDetector`
  wraps the MTCNN of facenet-pytorch, whose weights ship inside its wheel, so nothing is downloaded.
  `build_detector(spec)` makes the detector a `DetectorSpec` names: a checkpoint records its spec,
  and the server detects with the same settings the training data was prepared with.
- `align_face`: the similarity transform (scikit-image's least-squares estimate) from the five
  landmarks onto the ArcFace 112x112 template scaled to `size`, and the warp (Pillow's affine
  transform). `crop` keeps the centred share of the template's square, as it does for unaligned
  images.
- `Photo` and `aligned_crop`: how a photo file is read for both: a large JPEG decoded at a reduced
  scale for detection, and its face aligned from the coarsest decoding that keeps its detail.
  Training, evaluation and serving all read photos this way (docs/FACES.md, Large photos).

`Preparation` says how a model's faces were prepared (aligned or not, template, size, crop,
detector); faceid.data, faceid.inference and the server all prepare images through it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from faceid.errors import ImageError

log = logging.getLogger(__name__)

ALIGN_MODES = ("none", "arcface")
TEMPLATE = "arcface-112"
TEMPLATE_SIZE = 112
# Where ArcFace's 112x112 crops put the five landmarks (InsightFace's reference points), in the
# order Face.landmarks uses.
ARCFACE_POINTS = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)


class NoFaceError(ImageError):
    """No face was found in an image that had to have one."""


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    landmarks: tuple[tuple[float, float], ...]  # 5 x (x, y)
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self, exact: bool = False) -> dict[str, Any]:
        """For an answer (rounded to 0.01 px), or `exact` (as found: a cache must give back the
        very landmarks a fresh detection gives, or the aligned crops would differ)."""
        if exact:
            return {"box": list(self.box), "landmarks": [list(p) for p in self.landmarks], "score": self.score}
        return {
            "box": [round(v, 2) for v in self.box],
            "landmarks": [[round(x, 2), round(y, 2)] for x, y in self.landmarks],
            "score": round(self.score, 5),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Face":
        return cls(
            _box(float(v) for v in d["box"]), tuple((float(x), float(y)) for x, y in d["landmarks"]), float(d["score"])
        )

    def scaled(self, factor: float) -> "Face":
        return Face(
            _box(v * factor for v in self.box), tuple((x * factor, y * factor) for x, y in self.landmarks), self.score
        )


def _box(values: Iterable[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = values
    return x1, y1, x2, y2


LEGACY_NMS = (0.7, 0.7)  # facenet-pytorch's detect_face's overlaps, which older checkpoints used
SHRINK_MODES = ("pyramid", "resize")
LEGACY_SHRINK = "resize"  # how specs recorded without `shrink` brought a photo to max_side


@dataclass(frozen=True)
class DetectorSpec:
    """A detector and its settings: what a checkpoint records and a face cache is keyed by."""

    name: str = "mtcnn"
    max_side: int = 480  # photos are shrunk to this longer side for detection (not for alignment)
    min_face: int = 40  # smallest face searched for, in pixels of the shrunk photo
    min_score: float = 0.9  # detections below this score are not faces
    factor: float = 0.6  # the image pyramid's step
    thresholds: tuple[float, float, float] = (0.7, 0.8, 0.8)  # P-, R- and O-net's score thresholds
    # Overlap (IoU) above which the weaker of two candidates is dropped, after the P-net's pyramid
    # and after the R-net: fewer candidates reach the costlier next net (bench/README.md,
    # align_cost). Specs recorded without it used facenet-pytorch's 0.7 and 0.7 (LEGACY_NMS).
    nms: tuple[float, float] = (0.4, 0.4)
    # How a photo larger than max_side is searched (`shrink_for_detection`): "pyramid" reads the
    # pyramid's levels and the R- and O-nets' crops off the photo's own pixels (reduced by a whole
    # factor first where it is twice max_side or more), "resize" resizes the photo to max_side
    # first (Pillow, bilinear), as specs recorded without the setting did (LEGACY_SHRINK).
    shrink: str = "pyramid"

    @property
    def key(self) -> str:
        t = "-".join(f"{v:g}" for v in self.thresholds)
        key = f"{self.name}-{self.max_side}-{self.min_face}-{self.min_score:g}-{self.factor:g}-{t}"
        # the older specs' keys, so their face caches stay valid
        if self.nms != LEGACY_NMS:
            key += "-nms" + "-".join(f"{v:g}" for v in self.nms)
        return key if self.shrink == LEGACY_SHRINK else f"{key}-{self.shrink}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "thresholds": list(self.thresholds), "nms": list(self.nms)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DetectorSpec":
        fields: dict[str, Any] = {k: d[k] for k in ("name", "max_side", "min_face", "min_score", "factor") if k in d}
        if "thresholds" in d:
            fields["thresholds"] = tuple(float(v) for v in d["thresholds"])
        # a record written before the setting existed was detected with the legacy overlaps
        fields["nms"] = tuple(float(v) for v in d["nms"]) if "nms" in d else LEGACY_NMS
        fields["shrink"] = str(d.get("shrink", LEGACY_SHRINK))
        if fields["shrink"] not in SHRINK_MODES:
            raise ValueError(f"unknown detector shrink {fields['shrink']!r}; this FaceID has {', '.join(SHRINK_MODES)}")
        return cls(**fields)


# The finest detection a request may ask for (`search_spec`): photos shrunk to a 2,000 px longer
# side, which finds faces down to 2% of it with the default min_face (docs/GALLERIES.md says what
# it costs).
MAX_DETECT_SIDE = 2000
DETECT_SIDE_STEP = 160  # search_spec's finer sides: 640, 800, ..., 1920 and 2000
COARSE_FACE_STEP = 20  # search_spec's coarser min_faces, in pixels at max_side: 60, 80, 100, ...


def smallest_face_percent(spec: DetectorSpec) -> float:
    """The smallest face `spec` finds, in percent of a photo's longer side."""
    return 100 * spec.min_face / spec.max_side


def least_min_face(spec: DetectorSpec) -> float:
    """The smallest face `search_spec` can search for with `spec`, in percent of a photo's longer
    side (2 for the default spec)."""
    return smallest_face_percent(replace(spec, max_side=MAX_DETECT_SIDE))


def search_spec(spec: DetectorSpec, percent: Optional[float]) -> DetectorSpec:
    """`spec` searching faces down to `percent` of a photo's longer side; None gives `spec` itself.
    - Below `spec`'s own share (a face in a group photo): the photo is shrunk less for detection,
      to at most MAX_DETECT_SIDE, at more cost. The side is rounded up to a multiple of
      DETECT_SIDE_STEP.
    - Above it (a selfie, an ID photo, a webcam frame): the pyramid starts at a larger `min_face`,
      the photo shrunk as for `spec`, at less cost and with landmarks as precise; faces under
      `percent` may be missed (MTCNN still finds many down to about half of it). `min_face` is
      rounded down to a multiple of COARSE_FACE_STEP pixels.
    Either way every face down to `percent` is searched for, requests share a few detectors (each
    is built once and kept) whatever percents they send, and the faces found are aligned exactly
    as `spec`'s are (from the photo's own pixels), so a model is served as it was trained."""
    if percent is None:
        return spec
    side = math.ceil(100 * spec.min_face / percent)
    if side > spec.max_side:
        side = -(-side // DETECT_SIDE_STEP) * DETECT_SIDE_STEP
        return replace(spec, max_side=min(MAX_DETECT_SIDE, side))
    face = int(percent * spec.max_side / 100 // COARSE_FACE_STEP) * COARSE_FACE_STEP
    return replace(spec, min_face=face) if face > spec.min_face else spec


class FaceDetector(Protocol):
    spec: DetectorSpec

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Every face in each RGB image, largest first, in that image's pixel coordinates."""


def shrink_for_detection(img: Image.Image, spec: DetectorSpec) -> tuple[Image.Image, float]:
    """(the image the detector of `spec` searches `img` in, the factor back to `img`'s pixels).
    "resize": the image resized to a longer side of `max_side`. "pyramid": the image reduced by
    the largest whole factor that keeps its longer side at `max_side` or more (Pillow's `reduce`,
    the mean of each block of pixels; none below twice `max_side`); the detector then searches it
    at `max_side`'s scales (faceid.mtcnn.BatchedMTCNN.detect). Either way, a shrunk image is left
    as it is."""
    w, h = img.size
    longer, max_side = max(w, h), spec.max_side
    if longer <= max_side:
        return img, 1.0
    if spec.shrink == "pyramid":
        k = longer // max_side
        if k < 2:
            return img, 1.0
        small = img.reduce(k)
    else:
        s = max_side / longer
        small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return small, w / small.size[0]


class MTCNNDetector:
    """facenet-pytorch's MTCNN (P-, R- and O-net; weights inside the package), run by
    `faceid.mtcnn.BatchedMTCNN` with all the photos of a call in one pass through each stage. With
    the spec's overlaps at LEGACY_NMS it finds the faces and landmarks of facenet-pytorch's own
    `detect_face` (within 1e-4 px); the default overlaps are cheaper (DetectorSpec.nms). On a GPU
    give `device` "cuda"."""

    def __init__(self, spec: DetectorSpec = DetectorSpec(), device: Any = "cpu") -> None:
        from faceid.mtcnn import BatchedMTCNN

        self.spec = spec
        self.mtcnn = BatchedMTCNN(spec.min_face, spec.thresholds, spec.factor, device)
        self.device = self.mtcnn.device

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        import torch

        from faceid.runtime import ONE_THREAD_MAX_IMAGES, compute_threads

        shrunk = [shrink_for_detection(im, self.spec) for im in images]
        # Photos come in every size, and each size is a new pyramid of shapes: cuDNN's search for
        # the fastest kernels (on while a GPU trains) would run again for each, for minutes
        cudnn = torch.backends.cudnn
        one = self.device.type == "cpu" and len(images) <= ONE_THREAD_MAX_IMAGES
        with (
            cudnn.flags(
                enabled=cudnn.enabled, benchmark=False, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32
            ),
            compute_threads(1 if one else None),
        ):
            out = self._faces(shrunk, self.spec.nms)
            # Dropping overlapping candidates early can leave a face only its weaker detections, which
            # then score below min_score: a photo where nothing was found is searched once more with
            # facenet-pytorch's overlaps, so no face is lost to the cheaper search.
            again = [i for i, faces in enumerate(out) if not faces]
            if again and self.spec.nms != LEGACY_NMS:
                for i, faces in zip(again, self._faces([shrunk[i] for i in again], LEGACY_NMS)):
                    out[i] = faces
        return out

    def _faces(self, shrunk: Sequence[tuple[Image.Image, float]], nms: tuple[float, float]) -> list[list[Face]]:
        out: list[list[Face]] = []
        # "pyramid": the detector searches each image at max_side's scales; "resize" shrank it already
        max_side = self.spec.max_side if self.spec.shrink == "pyramid" else 0
        found = self.mtcnn.detect([im for im, _ in shrunk], nms, max_side)
        for (boxes, points), (_, factor) in zip(found, shrunk):
            faces = [
                Face(_box(b[:4].tolist()), tuple((float(x), float(y)) for x, y in p), float(b[4])).scaled(factor)
                for b, p in zip(boxes, points)
                if b[4] >= self.spec.min_score and np.isfinite(b).all() and np.isfinite(p).all()
            ]
            out.append(sorted(faces, key=lambda f: -f.area))
        return out


_DETECTORS: dict[tuple[DetectorSpec, str], FaceDetector] = {}
_DETECTORS_LOCK = threading.Lock()


def build_detector(spec: DetectorSpec, device: Any = "cpu") -> FaceDetector:
    """The detector `spec` names on `device`, built once per process (its weights are read once)."""
    if spec.name != "mtcnn":
        raise ValueError(f"unknown face detector {spec.name!r}; this FaceID has mtcnn")
    key = (spec, str(device))
    with _DETECTORS_LOCK:
        if key not in _DETECTORS:
            _DETECTORS[key] = MTCNNDetector(spec, device)
        return _DETECTORS[key]


def template_points(size: int, crop: float = 1.0) -> np.ndarray:
    """The ArcFace template's five points in a `size` x `size` crop that keeps the centred `crop`
    share of the template's square."""
    c = TEMPLATE_SIZE / 2
    return (ARCFACE_POINTS - c) * (size / (TEMPLATE_SIZE * crop)) + size / 2


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 similarity (rotation, uniform scale, translation) taking `src` points onto `dst`
    in the least-squares sense (scikit-image's Umeyama estimate)."""
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # pragma: no cover - older scikit-image
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.isfinite(tform.params).all():
        raise ValueError("the landmarks do not determine a similarity transform (all points coincide)")
    return np.asarray(tform.params, dtype=np.float64)


def _reduction(m: np.ndarray) -> int:
    """How many times `align_face` may reduce a photo before its warp `m` (full-size photo ->
    crop): a face much larger than the crop loses nothing to a whole-factor box filter first."""
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    return int(0.5 / scale) if scale > 0 else 1


def align_face(img: Image.Image, landmarks: Any, size: int, crop: float = 1.0, scale: int = 1) -> np.ndarray:
    """RGB image and its face's five landmarks -> uint8 [3, size, size]: the face turned, scaled and
    moved so that its landmarks fall on the ArcFace template (`template_points(size, crop)`).
    Areas outside the photo come out black. A face much larger than `size` is first reduced by a
    whole factor (a box filter), so the bilinear warp does not alias. `img` may be the photo
    decoded at 1/`scale` of its size (a reduced JPEG decoding, `aligned_crop`); the landmarks are
    in the full-size photo's pixels."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if scale > 1:
        src = (src + 0.5) / scale - 0.5
    dst = template_points(size, crop)
    m = _similarity(src, dst)
    factor = _reduction(m)
    if factor >= 2:
        img = img.reduce(factor)
        m = _similarity((src + 0.5) / factor - 0.5, dst)
    inverse = np.linalg.inv(m)
    warped = img.convert("RGB").transform(
        (size, size), Image.Transform.AFFINE, data=tuple(inverse[:2].ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.ascontiguousarray(np.asarray(warped, dtype=np.uint8).transpose(2, 0, 1))


def align_scale(landmarks: Any, size: int, crop: float = 1.0) -> int:
    """The largest JPEG decoding scale (1, 2, 4 or 8) that loses nothing `align_face` would keep of
    this face: align_face reduces the photo by at least that much before its warp."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    factor = min(8, _reduction(_similarity(src, template_points(size, crop))))
    scale = 1
    while scale * 2 <= factor:
        scale *= 2
    return scale


class Photo:
    """A photo being prepared for a model trained on aligned faces: decoded once for detection (a
    large JPEG at the reduced scale that keeps its longer side at `max_side` or more, as the face
    cache decodes training photos), and again at a finer scale only if its face needs one
    (`aligned_crop`). `image` is the photo at 1/`scale` of its size."""

    __slots__ = ("image", "scale", "source", "max_side", "options", "_finer")

    def __init__(
        self, image: Image.Image, scale: int = 1, source: Any = None, max_side: int = 0, **options: Any
    ) -> None:
        self.image, self.scale, self.source, self.max_side, self.options = image, scale, source, max_side, options
        self._finer: dict[int, Image.Image] = {}  # decoded again at these scales

    @classmethod
    def open(cls, source: Any, max_side: int, **options: Any) -> "Photo":
        """Decode a file or an upload's bytes (faceid.images.open_image's `options`: max_pixels,
        name, ...) for detection with a `max_side` detector (0: at full size)."""
        from faceid.images import open_image_scaled

        image, scale = open_image_scaled(source, reduce_longer_to=max_side or None, **options)
        return cls(image, scale, source, max_side, **options)

    @property
    def full_size(self) -> tuple[int, int]:
        return self.image.size[0] * self.scale, self.image.size[1] * self.scale

    def faces(self, detector: "FaceDetector") -> list[Face]:
        """Every face `detector` finds in the photo, largest first, in its full-size pixels."""
        return Photo.faces_of(detector, [self])[0]

    @staticmethod
    def faces_of(detector: "FaceDetector", photos: Sequence["Photo"]) -> list[list[Face]]:
        """`faces` of each of `photos`, found with one `detector` call for all of them (the same
        faces as one at a time, up to the nets' arithmetic in another batch)."""
        found = detector.detect([p.image for p in photos]) if photos else []
        return [[f.scaled(p.scale) for f in faces] for p, faces in zip(photos, found)]

    def at(self, scale: int) -> Image.Image:
        """The photo decoded at 1/`scale` of its size (at most the scale it was opened at)."""
        if scale == self.scale:
            return self.image
        if scale not in self._finer:
            from faceid.images import open_image_scaled

            image, got = open_image_scaled(self.source, reduce_longer_to=self.max_side, max_scale=scale, **self.options)
            if got != scale:  # pragma: no cover - a scale finer than the one it was opened at is always there
                raise RuntimeError(f"decoded at 1/{got}, not 1/{scale}")
            self._finer[scale] = image
        return self._finer[scale]


def aligned_crop(photo: Photo, face: Face, size: int, crop: float = 1.0, reduced: bool = True) -> np.ndarray:
    """`face` (in the full-size photo's pixels) aligned from `photo` (`align_face`). `reduced`: from
    the photo decoded at the coarsest scale that keeps the face's detail (`align_scale`, but no
    coarser than the photo was opened at, so most photos are decoded once); otherwise from the
    full-size photo."""
    scale = min(photo.scale, align_scale(face.landmarks, size, crop)) if reduced and photo.scale > 1 else 1
    return align_face(photo.at(scale), face.landmarks, size, crop, scale)


@dataclass(frozen=True)
class Preparation:
    """How a model's input images are made from photos. align "none": the centred `crop` square
    resized to img_size (checkpoints from before alignment); "arcface": the largest face the
    detector finds, aligned onto the ArcFace template. `reduced_decode`: a large JPEG's face is
    aligned from the photo decoded at a reduced scale that keeps the face's detail
    (`aligned_crop`); records written before the setting existed aligned from the full-size photo."""

    align: str = "none"
    img_size: int = 112
    crop: float = 1.0
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    template: str = TEMPLATE
    reduced_decode: bool = True

    @property
    def aligned(self) -> bool:
        return self.align != "none"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"align": self.align, "img_size": self.img_size, "crop": self.crop}
        if self.aligned:
            out.update(template=self.template, detector=self.detector.to_json(), reduced_decode=self.reduced_decode)
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> "Preparation":
        """The record a checkpoint holds under "faces"; a checkpoint without one (written before
        alignment existed) is prepared as it always was: unaligned."""
        rec = ckpt.get("faces")
        img_size, crop = int(ckpt["img_size"]), float(ckpt.get("crop", 1.0))
        if not isinstance(rec, dict) or rec.get("align", "none") == "none":
            return cls("none", img_size, crop)
        if rec.get("align") not in ALIGN_MODES:
            raise ValueError(f"faces.align {rec.get('align')!r} is not one of {', '.join(ALIGN_MODES)}")
        if rec.get("template", TEMPLATE) != TEMPLATE:
            raise ValueError(f"faces.template {rec.get('template')!r}; this FaceID knows {TEMPLATE}")
        detector = DetectorSpec.from_json(rec.get("detector") or {})
        return cls(str(rec["align"]), img_size, crop, detector, reduced_decode=bool(rec.get("reduced_decode", False)))


def pick_face(faces: Sequence[Face]) -> Optional[Face]:
    """The face a photo is embedded by: the largest one (faces come largest first)."""
    return max(faces, key=lambda f: f.area) if faces else None
