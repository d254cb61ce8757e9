"""How fast a photo becomes a model input, at full scale and at libjpeg's reduced scale.

Users send phone photos (3 to 12 MP, sometimes more) to `/verify` and train on folders of them;
the model looks at 56 to 112 px. FaceID decodes a large JPEG at 1/2, 1/4 or 1/8 scale (DCT
scaling inside libjpeg) as long as its shorter side keeps twice the pixels the crop needs
(faceid.data.decode_side), then resizes as before. For each photo size this prints, measured in
one run, side by side and interleaved:

  full ms      faceid.images.open_image + resize_center_crop, the whole picture decoded
  reduced ms   the same with reduce_to=decode_side (what training, evaluation and serving do)
  speed-up     full / reduced
  grey levels  mean absolute difference between the two model inputs (uint8, 0 to 255)
  1 - cosine   with --checkpoint: how far apart the two inputs' embeddings are (the highest)

With --aligned, the same for a model trained on aligned faces (faceid.faces.Photo): "full" decodes
the whole picture, shrinks it for the detector (480 px) and aligns the face from it; "reduced"
decodes the JPEG as far reduced as the detector allows, shrinks that, and aligns the face from the
coarsest decoding that keeps its detail (`aligned_crop`). The face's landmarks are found once
beforehand; the detector itself, the same in both, is not timed.

The photos are the shipped sample's faces (data/sample/val) enlarged with bicubic resampling, film
grain added (Gaussian, sigma 6 grey levels) so that they are not unnaturally smooth, and saved as
JPEG quality 92: real phone photos have finer detail, so their decoding costs a little more.

    python bench/decode_speed.py                                       # about 1 minute here
    python bench/decode_speed.py --img_size 112 --crop 1.0 --checkpoint models/<job>/backbone_best.pt
    python bench/decode_speed.py --aligned --crop 1.0
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_common import loadavg, machine  # noqa: E402

from faceid.data import decode_side, resize_center_crop  # noqa: E402
from faceid.faces import DetectorSpec, Photo, align_face, aligned_crop, build_detector, shrink_for_detection  # noqa: E402
from faceid.images import open_image  # noqa: E402


def unaligned_ways(data: bytes, size: int, crop: float, side: int):
    """The whole picture decoded, and the JPEG decoded down to `side`: each a function -> (model
    input, what was decoded)."""

    def full():
        return resize_center_crop(open_image(data), size, crop), ""

    def reduced():
        img = open_image(data, reduce_to=side)
        return resize_center_crop(img, size, crop), f"{img.size[0]}x{img.size[1]}"

    return full, reduced


def aligned_ways(data: bytes, size: int, crop: float, landmarks):
    """The two ways an aligned model reads a photo, each a function -> (model input, what was decoded)."""
    spec = DetectorSpec()
    max_side = spec.max_side

    def full():
        img = open_image(data)
        shrink_for_detection(img, spec)
        return align_face(img, landmarks, size, crop), f"{img.size[0]}x{img.size[1]}"

    def reduced():
        photo = Photo.open(data, max_side)
        shrink_for_detection(photo.image, spec)
        face = type("Face", (), {"landmarks": landmarks})
        out = aligned_crop(photo, face, size, crop)  # type: ignore[arg-type]
        return out, f"{photo.image.size[0]}x{photo.image.size[1]}"

    return full, reduced


def photo(face: Path, long_side: int, seed: int) -> bytes:
    img = Image.open(face).convert("RGB")
    w = long_side
    h = round(long_side * 3 / 4)  # a 4:3 frame, the face in the middle
    big = img.resize((h, h), Image.BICUBIC)
    canvas = Image.new("RGB", (w, h), (128, 128, 128))
    canvas.paste(big, ((w - h) // 2, 0))
    arr = np.asarray(canvas).astype(np.int16)
    arr += np.random.default_rng(seed).normal(0, 6, arr.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--img_size", type=int, default=56, help="the model's input (default: the cpu-small preset's 56)")
    ap.add_argument("--crop", type=float, default=0.8, help="the model's crop (default: the preset's 0.8)")
    ap.add_argument(
        "--sizes",
        default="640,1600,2400,4000",
        help="long sides of the test photos in px (4:3; 4000 = a 12 MP phone photo)",
    )
    ap.add_argument("--photos", type=int, default=4, help="faces per size")
    ap.add_argument("--repeats", type=int, default=5, help="timed decodes of each photo, each way")
    ap.add_argument("--aligned", action="store_true", help="a model trained on aligned faces (see above)")
    ap.add_argument(
        "--checkpoint",
        help="also embed both inputs with this model and report the cosine (its own img_size and crop are then used)",
    )
    args = ap.parse_args()

    verifier = None
    size, crop = args.img_size, args.crop
    if args.checkpoint:
        import torch

        from faceid.inference import Verifier

        verifier = Verifier.from_checkpoint(args.checkpoint, device="cpu")
        size, crop = verifier.img_size, verifier.crop
    side = decode_side(size, crop)
    faces = sorted((REPO / "data" / "sample" / "val").glob("*/*.jpg"))[: args.photos]
    detector = build_detector(DetectorSpec()) if args.aligned else None
    print(f"machine: {machine()}; load average {loadavg()}")
    if detector is not None:
        print(f"model input {size} px, crop {crop}, aligned: JPEGs decoded as the detector and the face allow\n")
    else:
        print(f"model input {size} px, crop {crop}: JPEGs decoded down to a shorter side of at least {side} px\n")
    print("| photo | MB | reduced decode | full ms | reduced ms | speed-up | grey levels | 1 - cosine |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for long_side in (int(s) for s in args.sizes.split(",")):
        full_ms, red_ms, diffs, cosines, mbs = [], [], [], [], []
        scale = ""
        for k, face in enumerate(faces):
            data = photo(face, long_side, k)
            mbs.append(len(data) / 1e6)
            if detector is not None:
                landmarks = detector.detect([open_image(data)])[0][0].landmarks
                ways = aligned_ways(data, size, crop, landmarks)
            else:
                ways = unaligned_ways(data, size, crop, side)
            for way in ways:  # warm: first calls load lazily imported pieces
                way()
            a = b = None
            for _ in range(args.repeats):  # interleaved, so a drifting machine affects both alike
                t = time.perf_counter()
                a, _ = ways[0]()
                full_ms.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
                b, scale = ways[1]()
                red_ms.append(1000 * (time.perf_counter() - t))
            diffs.append(float(np.abs(a.astype(int) - b.astype(int)).mean()))
            if verifier is not None:
                ea, eb = verifier.embed([torch.from_numpy(a), torch.from_numpy(b)])
                cosines.append(float(ea @ eb))
        f, r = statistics.median(full_ms), statistics.median(red_ms)
        cos = f"{max(1.0 - c for c in cosines):.1e}" if cosines else "-"
        print(
            f"| {long_side}x{round(long_side * 3 / 4)} | {statistics.mean(mbs):.2f} | {scale} | {f:.1f} | "
            f"{r:.1f} | {f / r:.2f}x | {statistics.mean(diffs):.2f} | {cos} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
