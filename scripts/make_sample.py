"""Cut the small real sample that ships in `data/sample/` out of a full LFW folder.

The sample is an ImageFolder pair of splits with disjoint identities, plus a `pairs.txt` for the
val split in the LFW protocol format, so that every FaceID feature (training, sampled-pair
evaluation, pairs-file evaluation, inference) can be tried in seconds without downloading LFW:

    python scripts/make_sample.py --lfw "$FACEID_LFW_DIR" --out data/sample

Everything is chosen by one seeded `random.Random` over sorted name lists, so the same LFW folder
and the same arguments always give the same files. JPEGs are copied byte for byte, under their
LFW names.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import re
import shutil
import sys
from pathlib import Path

logger = logging.getLogger("make_sample")

# LFW file names are <Name>_<NNNN>.jpg; pairs files refer to an image by that number.
_LFW_FILE = re.compile(r"^(?P<name>.+)_(?P<num>\d{4})\.jpg$")


def list_identities(lfw: Path) -> dict[str, list[Path]]:
    """Map each person folder of `lfw` to its sorted JPEGs. The protocol .txt files are skipped."""
    people: dict[str, list[Path]] = {}
    for folder in sorted(p for p in lfw.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if _LFW_FILE.match(p.name))
        if images:
            people[folder.name] = images
    return people


def image_number(path: Path) -> int:
    """The LFW image number of `Name_0003.jpg` (3), as used in pairs files."""
    match = _LFW_FILE.match(path.name)
    if match is None:
        raise ValueError(f"not an LFW image name: {path.name}")
    return int(match.group("num"))


def choose_split(
    people: dict[str, list[Path]],
    rng: random.Random,
    *,
    count: int,
    min_images: int,
    max_images: int,
    exclude: set[str],
) -> dict[str, list[Path]]:
    """Draw `count` identities with at least `min_images` images, keeping at most `max_images`
    of each (a seeded subset, so no one person dominates the split)."""
    eligible = [n for n in sorted(people) if len(people[n]) >= min_images and n not in exclude]
    if len(eligible) < count:
        raise SystemExit(
            f"error: only {len(eligible)} identities have >= {min_images} images; "
            f"ask for fewer than {count} or lower the minimum"
        )
    chosen = sorted(rng.sample(eligible, count))
    split = {}
    for name in chosen:
        images = people[name]
        if len(images) > max_images:
            images = sorted(rng.sample(images, max_images))
        split[name] = images
    return split


def matched_pairs(split: dict[str, list[Path]], rng: random.Random, n: int) -> list[tuple]:
    """`n` distinct same-person pairs, taken round-robin over identities so that people with
    many images do not supply most of them."""
    pools = []
    for name in sorted(split):
        numbers = [image_number(p) for p in split[name]]
        combos = list(itertools.combinations(numbers, 2))
        rng.shuffle(combos)
        pools.append([(name, a, b) for a, b in combos])
    available = sum(len(p) for p in pools)
    if available < n:
        raise SystemExit(f"error: the val split allows only {available} matched pairs, not {n}")
    pairs: list[tuple] = []
    for round_ in itertools.zip_longest(*pools):
        pairs.extend(p for p in round_ if p is not None)
        if len(pairs) >= n:
            break
    return sorted(pairs[:n])


def mismatched_pairs(split: dict[str, list[Path]], rng: random.Random, n: int) -> list[tuple]:
    """`n` distinct pairs of images of two different people."""
    names = sorted(split)
    if len(names) < 2:
        raise SystemExit("error: mismatched pairs need at least 2 val identities")
    seen: set[tuple] = set()
    while len(seen) < n:
        a, b = sorted(rng.sample(names, 2))
        seen.add((a, image_number(rng.choice(split[a])), b, image_number(rng.choice(split[b]))))
    return sorted(seen)


def write_pairs(path: Path, matched: list[tuple], mismatched: list[tuple]) -> None:
    """LFW pairs format with one fold: `1<TAB>N`, N matched lines, then N mismatched lines."""
    lines = [f"1\t{len(matched)}"]
    lines += ["\t".join(map(str, p)) for p in matched]
    lines += ["\t".join(map(str, p)) for p in mismatched]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def copy_split(split: dict[str, list[Path]], dest: Path) -> int:
    """Copy the chosen JPEGs unchanged to `dest/<Name>/`; return the number of files."""
    n = 0
    for name, images in split.items():
        (dest / name).mkdir(parents=True)
        for src in images:
            shutil.copyfile(src, dest / name / src.name)
            n += 1
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lfw", type=Path, required=True, help="LFW folder, one per person")
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_ids", type=int, default=40, help="identities in train")
    parser.add_argument("--train_min", type=int, default=6, help="fewest images per train identity")
    parser.add_argument("--train_max", type=int, default=8, help="most images per train identity")
    parser.add_argument("--val_ids", type=int, default=20, help="identities in val")
    parser.add_argument("--val_min", type=int, default=3, help="fewest images per val identity")
    parser.add_argument("--val_max", type=int, default=8, help="most images kept per val identity")
    parser.add_argument("--pairs", type=int, default=100, help="matched (and mismatched) val pairs")
    parser.add_argument("--force", action="store_true", help="replace existing train/ and val/")
    args = parser.parse_args(argv)
    if args.val_min < 2:
        parser.error("--val_min must be at least 2: a val identity needs a matched pair")
    if args.train_min > args.train_max or args.val_min > args.val_max:
        parser.error("a split's minimum images per identity must not exceed its maximum")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if not args.lfw.is_dir():
        raise SystemExit(f"error: --lfw {args.lfw} is not a folder")
    train_dir, val_dir = args.out / "train", args.out / "val"
    for folder in (train_dir, val_dir):
        if folder.exists():
            if not args.force:
                raise SystemExit(f"error: {folder} exists; pass --force to replace it")
            shutil.rmtree(folder)

    people = list_identities(args.lfw)
    rng = random.Random(args.seed)
    train = choose_split(
        people,
        rng,
        count=args.train_ids,
        min_images=args.train_min,
        max_images=args.train_max,
        exclude=set(),
    )
    val = choose_split(
        people,
        rng,
        count=args.val_ids,
        min_images=args.val_min,
        max_images=args.val_max,
        exclude=set(train),
    )
    matched = matched_pairs(val, rng, args.pairs)
    mismatched = mismatched_pairs(val, rng, args.pairs)

    n_train = copy_split(train, train_dir)
    n_val = copy_split(val, val_dir)
    write_pairs(args.out / "pairs.txt", matched, mismatched)
    logger.info("train: %d identities, %d images", len(train), n_train)
    logger.info("val: %d identities, %d images", len(val), n_val)
    logger.info("pairs.txt: %d matched + %d mismatched", len(matched), len(mismatched))
    return 0


if __name__ == "__main__":
    sys.exit(main())
