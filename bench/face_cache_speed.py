"""How fast a training folder's faces are found the first time: `faceid.facecache.find_faces` (what
`faceid train`, a job and `faceid prepare` run) on LFW photos with an empty cache, the detector
called for one photo at a time against DETECT_CHUNK photos at a time, measured side by side.

Each block finds the faces of the same photos once per setting, in alternating order, each time
into an empty cache folder, with `--workers` DataLoader workers (the CPU path: each worker decodes
and detects).

    python bench/face_cache_speed.py                       # FACEID_LFW_DIR; about 30 seconds
    python bench/face_cache_speed.py --images 8000 --blocks 3

The time includes starting the workers (each loads the detector): with 1,000 photos that start
weighs on both settings, and the ratio shrinks.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import machine

import faceid.facecache as facecache
from faceid.faces import DetectorSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lfw", default=os.environ.get("FACEID_LFW_DIR"), help="LFW folder (default: FACEID_LFW_DIR)")
    p.add_argument("--images", type=int, default=3000, help="photos per measurement (a fixed random choice)")
    p.add_argument("--blocks", type=int, default=2, help="alternating blocks per setting")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if not args.lfw or not Path(args.lfw).is_dir():
        raise SystemExit("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder")
    logging.basicConfig(level=logging.WARNING)
    photos = sorted(Path(args.lfw).glob("*/*.jpg"))
    random.Random(0).shuffle(photos)
    photos = photos[: args.images]
    spec = DetectorSpec()
    settings = {"one at a time": 1, f"{facecache.DETECT_CHUNK} at a time": facecache.DETECT_CHUNK}
    rates: dict[str, list[float]] = {name: [] for name in settings}
    found: dict[str, int] = {}
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    for block in range(args.blocks):
        names = list(settings) if block % 2 == 0 else list(settings)[::-1]
        for name in names:
            facecache.DETECT_CHUNK = settings[name]
            folder = Path(tempfile.mkdtemp(prefix="face_cache_speed-"))
            try:
                t = time.perf_counter()
                faces = facecache.find_faces(photos, spec, workers=args.workers, folder=folder)
                rates[name].append(len(photos) / (time.perf_counter() - t))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            found[name] = sum(bool(f) for f in faces)
        print(f"block {block + 1}/{args.blocks} done", flush=True)
    base = statistics.median(rates["one at a time"])
    print(
        f"\n{started}, {machine()}, {len(photos)} LFW photos, {args.workers} workers, "
        f"{args.blocks} alternating blocks, detector {spec.key}"
    )
    print("| detector calls | images/s (median) | against one at a time | photos with a face |")
    print("|---|---|---|---|")
    for name in settings:
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {found[name]} of {len(photos)} |")


if __name__ == "__main__":
    main()
