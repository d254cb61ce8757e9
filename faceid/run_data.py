"""The images of a training run: --train and --val listed, then decoded (or their headers
checked), and the --pairs_file protocol with its images (docs/CLI.md, "Data")."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from faceid.config import TrainConfig
from faceid.data import IdentityFolder, scan_folder
from faceid.errors import DataError
from faceid.evaluate import protocol_folder
from faceid.faces import DetectorSpec, Preparation
from faceid.imagestore import ImageStore, load_images
from faceid.pairs import load_protocol

# A pairs protocol ready to score: the store of its images, each pair's rows in it (ia, ib), the
# pairs' labels and folds
Protocol = tuple[ImageStore, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def scan_run_folders(cfg: TrainConfig) -> tuple[IdentityFolder, IdentityFolder]:
    """List --train and --val (nothing decoded yet). --val needs 2 people with 2+ images each:
    same-person and different-person pairs."""
    train = scan_folder(cfg.train, what="--train", min_identities=2)
    val = scan_folder(cfg.val, what="--val", min_identities=2, min_per_identity=2)
    return train, val


def load_options(cfg: TrainConfig, device: torch.device, cache: Optional[str] = None) -> dict[str, Any]:
    """load_images' arguments of a run with `cfg`; `cache`, if given, instead of --cache_images."""
    return dict(
        workers=cfg.workers,
        crop=cfg.crop,
        cache=cache or cfg.cache_images,
        cache_max_gb=cfg.cache_max_gb,
        align=cfg.align,
        detector=DetectorSpec(),
        device=device,
        reduced_decode=Preparation().reduced_decode,  # as the checkpoint records it (faceid.run_state)
    )


def load_protocol_images(
    cfg: TrainConfig, progress: Callable[[int, int], None], **options: Any
) -> tuple[IdentityFolder, Protocol]:
    """--pairs_file's pairs (faceid.pairs.load_protocol) and its images, decoded with `options`
    (images without a face are used unaligned). DataError for a protocol too small for k-fold
    accuracy or with images that cannot be read."""
    assert cfg.pairs_file is not None  # called for a run with --pairs_file
    proto = load_protocol(cfg.pairs_file, cfg.val, folds=cfg.pairs_folds)
    pf = proto.source
    n_same = int(proto.labels.sum())
    if len(np.unique(proto.folds)) < 2 and max(n_same, len(proto) - n_same) < 2:
        # score_protocol could not form 2 folds: stop now, not after the first epoch
        raise DataError(
            f"{pf}: {len(proto)} pair(s) in one fold are too few for k-fold accuracy; "
            "select more folds with --pairs_folds or use a pairs file with at least 2 "
            "matched and 2 mismatched pairs"
        )
    paths = proto.unique_paths()
    folder, store = load_images(
        protocol_folder(paths),
        cfg.img_size,
        what="--pairs_file images",
        no_face="center",
        progress=progress,
        min_identities=1,
        **options,
    )
    if len(folder) != len(paths):
        raise DataError(
            f"{len(paths) - len(folder)} image(s) named in {pf} cannot be read "
            f"(first: {folder.skipped[0][0]}); fix or remove those pairs"
        )
    ia, ib = proto.index_pairs({p: i for i, p in enumerate(paths)})
    return folder, (store, ia, ib, proto.labels, proto.folds)
