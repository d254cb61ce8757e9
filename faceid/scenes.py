"""Whole-scene photos made from face crops, to check detection and alignment where faces are small,
off-centre and turned, as in the photos users bring.

`make_scene(faces, rng)` pastes each face crop at a random scale, position and in-plane rotation
onto a cluttered background (gradients, shapes, lines and noise drawn here), and returns the photo
with where each face went. No face crop: a scene with clutter only. Used by the tests and by
bench/align_compare.py; `python -m faceid.scenes SRC DST` writes a scene version of an ImageFolder.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class Placed:
    center: tuple[float, float]  # where the crop's centre went, in scene pixels
    side: float  # the crop's side after scaling, in scene pixels
    angle: float  # degrees, counter-clockwise as Pillow's rotate

    def to_scene(self, points: Any, crop_size: tuple[int, int]) -> np.ndarray:
        """Points [N, 2] in the pixels of the face crop that was pasted (its size `crop_size`,
        width and height), where they went in the scene: scaled, turned and moved as the crop was.
        Pixel centres are at whole coordinates, as a detector's landmarks are."""
        side = pasted_side(self.side)
        scale = side / np.asarray(crop_size, dtype=np.float64)
        p = (np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5) * scale - side / 2
        a = math.radians(self.angle)
        cos, sin = math.cos(a), math.sin(a)
        # Pillow turns the crop about its centre, counter-clockwise as seen (y points down)
        turned = np.stack([cos * p[:, 0] + sin * p[:, 1], -sin * p[:, 0] + cos * p[:, 1]], axis=1)
        return turned + np.asarray(self.center, dtype=np.float64) - 0.5


def pasted_side(side: float) -> int:
    """The side, in whole pixels, that make_scene resizes a crop to for a face of `side`."""
    return max(8, round(side))


def background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A cluttered picture with no face in it: a colour gradient, shapes, lines and noise."""
    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    grad = (top * (1 - t) + bottom * t).repeat(w, axis=1)
    img = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 30))):
        x1, y1 = rng.uniform(-0.1, 1.0) * w, rng.uniform(-0.1, 1.0) * h
        x2, y2 = x1 + rng.uniform(0.03, 0.4) * w, y1 + rng.uniform(0.03, 0.4) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle((x1, y1, x2, y2), fill=colour)
        elif kind == 1:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
        else:
            draw.line((x1, y1, x2, y2), fill=colour, width=int(rng.integers(1, 8)))
    noise = rng.normal(0, 8, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").filter(ImageFilter.GaussianBlur(0.6))


def make_scene(
    faces: Sequence[Image.Image],
    rng: np.random.Generator,
    *,
    size: tuple[int, int] | None = None,
    max_angle: float = 30.0,
    side_range: tuple[float, float] = (0.22, 0.5),
) -> tuple[Image.Image, list[Placed]]:
    """A scene of `size` (default: a random landscape or portrait photo of 480 to 800 px) with
    each face crop pasted at a random place, without overlapping the others, each scaled so its
    side is `side_range` of the scene's shorter side and turned by up to `max_angle` degrees."""
    if size is None:
        long, short = int(rng.integers(560, 801)), int(rng.integers(420, 561))
        size = (long, short) if rng.random() < 0.6 else (short, long)
    scene = background(size, rng)
    w, h = size
    placed: list[Placed] = []
    lo, hi = side_range
    if len(faces) > 1:  # room for each
        hi = min(hi, 0.9 / len(faces))
        lo = min(lo, hi * 0.8)
    for face in faces:
        side = rng.uniform(lo, hi) * min(w, h)
        angle = float(rng.uniform(-max_angle, max_angle))
        crop = face.convert("RGB").resize((pasted_side(side),) * 2, Image.Resampling.BILINEAR)
        mask = Image.new("L", crop.size, 255)
        rotated = crop.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        rmask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        rw, rh = rotated.size
        for _ in range(200):
            x, y = rng.uniform(0, w - rw), rng.uniform(0, h - rh)
            c = (x + rw / 2, y + rh / 2)
            if all(math.dist(c, p.center) > (side + p.side) * 0.75 for p in placed):
                break
        scene.paste(rotated, (round(x), round(y)), rmask)
        placed.append(Placed((round(x) + rw / 2, round(y) + rh / 2), side, angle))
    return scene, placed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m faceid.scenes",
        description="Write a scene version of an ImageFolder: each face crop "
        "pasted into a cluttered photo (same folder layout and file names).",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    src, dst = Path(args.src), Path(args.dst)
    for f in sorted(src.rglob("*")):
        if f.suffix.lower() in (".jpg", ".jpeg", ".png") and f.is_file():
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            scene, _ = make_scene([Image.open(f)], rng)
            scene.save(out.with_suffix(".jpg"), quality=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
