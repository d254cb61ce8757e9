"""How precisely faces are found in whole-scene photos, per detector setting, and what each costs.

Each LFW face crop's five landmarks, found in the crop itself with the default detector, are
carried through the paste (faceid.scenes: scaled, turned by up to 30 degrees and placed in a
cluttered 480-800 px photo, saved as a JPEG of quality 90) to where they went in the scene. Each
setting then finds the face in the scene file as the server reads a photo (faceid.faces.Photo: a
large JPEG decoded at a reduced scale, shrunk for detection, the landmarks in full-size pixels).

Error: the mean distance of the five landmarks from where they went, over the distance between
the eyes (NME). The pasted face is found when a face's landmarks lie within one eye distance of
where they went. Faces span 8 to 50% of the scene's shorter side; "small" are those under 15% of
its longer side. Time: reading and detection of one photo on one compute thread, the settings
taking turns photo by photo.

    python bench/landmark_error.py                             # FACEID_LFW_DIR; about a minute
    python bench/landmark_error.py --photos 1000 --specs 480/40,480/40/resize,360/30

A setting is DetectorSpec's max_side/min_face, and its shrink where not the default (pyramid:
searched at max_side's scales in the photo's own pixels; resize: resized to max_side first), the
rest as the defaults.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import machine

from faceid.faces import SHRINK_MODES, DetectorSpec, Photo, build_detector
from faceid.scenes import make_scene


def parse_specs(text: str) -> dict[str, DetectorSpec]:
    """ "480/40,480/40/resize": max_side/min_face, and the shrink mode where not the default."""
    specs = {}
    for item in text.split(","):
        parts = item.split("/")
        try:
            side, face = (int(v) for v in parts[:2])
            shrink = parts[2] if len(parts) == 3 else DetectorSpec().shrink
            if len(parts) > 3 or shrink not in SHRINK_MODES:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not max_side/min_face[/shrink], e.g. 480/40 or 480/40/resize"
            ) from None
        specs[item] = replace(DetectorSpec(), max_side=side, min_face=face, shrink=shrink)
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lfw", default=os.environ.get("FACEID_LFW_DIR"), help="LFW folder (default: FACEID_LFW_DIR)")
    p.add_argument("--photos", type=int, default=300, help="face crops, a fixed random choice")
    default = DetectorSpec()
    p.add_argument(
        "--specs",
        type=parse_specs,
        default=f"{default.max_side}/{default.min_face},{default.max_side}/{default.min_face}/resize",
        help="settings to compare: max_side/min_face[/shrink],... (shrink: pyramid or resize)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.lfw or not Path(args.lfw).is_dir():
        raise SystemExit("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder")
    torch.set_num_threads(1)
    specs = args.specs
    crops = sorted(Path(args.lfw).glob("*/*.jpg"))
    random.Random(args.seed).shuffle(crops)
    rng = np.random.default_rng(args.seed)
    reference = build_detector(default)
    errors: dict[str, list[tuple[float, float]]] = {k: [] for k in specs}  # (face share, NME or inf)
    seconds: dict[str, list[float]] = {k: [] for k in specs}
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    used = 0
    for path in crops:
        if used == args.photos:
            break
        crop = Image.open(path).convert("RGB")
        faces = reference.detect([crop])[0]
        if not faces:
            continue
        used += 1
        scene, (placed,) = make_scene([crop], rng, side_range=(0.08, 0.5))
        truth = placed.to_scene(faces[0].landmarks, crop.size)
        eyes = float(np.linalg.norm(truth[0] - truth[1]))
        buf = io.BytesIO()
        scene.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        share = placed.side / max(scene.size)
        order = list(specs) if used % 2 else list(specs)[::-1]
        for name in order:
            spec = specs[name]
            t = time.perf_counter()
            photo = Photo.open(data, spec.max_side)
            found = Photo.faces_of(build_detector(spec), [photo])[0]
            seconds[name].append(time.perf_counter() - t)
            gaps = [float(np.linalg.norm(np.asarray(f.landmarks) - truth, axis=1).mean()) for f in found]
            nme = min(gaps) / eyes if gaps and min(gaps) < eyes else float("inf")
            errors[name].append((share, nme))
    print(f"\n{started}, {machine()}, {used} LFW crops pasted into scenes (seed {args.seed}), one compute thread")
    print(
        "| setting (max_side/min_face) | found | NME mean | NME median | NME 90th pct | NME over 0.2 "
        "| small faces: NME mean (faces) | others: NME mean (faces) | ms per photo |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in specs:
        rows = errors[name]
        ok = np.array([e for _, e in rows if np.isfinite(e)])
        small = [e for s, e in rows if np.isfinite(e) and s < 0.15]
        large = [e for s, e in rows if np.isfinite(e) and s >= 0.15]
        print(
            f"| {name} | {len(ok)} of {len(rows)} | {ok.mean():.4f} | {np.median(ok):.4f} "
            f"| {np.percentile(ok, 90):.4f} | {int((ok > 0.2).sum())} "
            f"| {np.mean(small):.4f} ({len(small)}) | {np.mean(large):.4f} ({len(large)}) "
            f"| {1000 * statistics.median(seconds[name]):.1f} |"
        )


if __name__ == "__main__":
    main()
