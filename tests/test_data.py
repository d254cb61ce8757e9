"""faceid.data: folder scanning and its errors, unreadable images, pair and batch sampling, and
the batch transform."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from core_fixtures import make_identity_folder, write_image
from PIL import Image

from faceid.data import (
    BatchTransform,
    classification_batches,
    decode_image,
    resize_center_crop,
    sample_pairs,
    scan_folder,
)
from faceid.errors import DataError
from faceid.imagestore import load_images
from faceid.model import IMAGENET_MEAN, IMAGENET_STD

# --- scan_folder --------------------------------------------------------------------------------


def test_scan_ignores_non_images_and_non_directories(tmp_path):
    root = make_identity_folder(tmp_path / "ds", {"ann": 2, "bob": 3})
    (root / "README.md").write_text("not a person")
    (root / "stray.jpg").write_bytes(b"an image file at the root is not an identity")
    (root / "ann" / "notes.txt").write_text("x")
    (root / "ann" / "thumbs.db").write_bytes(b"\0")
    (root / "bob" / "nested").mkdir()
    (root / "only_text").mkdir()
    (root / "only_text" / "a.txt").write_text("x")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "x.png")
    write_image(root / "cid" / "UPPER.PNG")  # extensions in any case

    folder = scan_folder(root)

    assert folder.names == ["ann", "bob", "cid"]
    assert len(folder) == 6
    assert [p.name for p in folder.paths if p.parent.name == "ann"] == ["ann_0000.png", "ann_0001.png"]
    assert folder.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert folder.counts().tolist() == [2, 3, 1]


def _data_error(root, **kw) -> str:
    with pytest.raises(DataError) as ei:
        scan_folder(root, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    msg = _data_error(tmp_path / "nope", what="--train")
    assert str(tmp_path / "nope") in msg and "not found" in msg and "--train" in msg


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    msg = _data_error(f)
    assert str(f) in msg and "not a folder" in msg


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _data_error(tmp_path / "empty")
    assert str(tmp_path / "empty") in msg and "no images" in msg


def test_folder_of_loose_images_names_the_expected_layout(tmp_path):
    write_image(tmp_path / "flat" / "a.jpg")
    msg = _data_error(tmp_path / "flat")
    assert "<person>" in msg


def test_one_identity_is_not_enough_to_train(tmp_path):
    root = make_identity_folder(tmp_path / "one", {"ann": 3})
    msg = _data_error(root, what="--train", min_identities=2)
    assert str(root) in msg and "1 identity" in msg and "at least 2" in msg


def test_val_without_any_identity_with_two_images(tmp_path):
    root = make_identity_folder(tmp_path / "val", {"ann": 1, "bob": 1, "cid": 1})
    msg = _data_error(root, what="--val", min_identities=1, min_per_identity=2)
    assert str(root) in msg and "2 or more images" in msg


def test_val_needs_two_people_with_two_images(tmp_path):
    # one usable person gives same-person pairs but no different-person pair
    root = make_identity_folder(tmp_path / "val", {"ann": 3, "bob": 1})
    msg = _data_error(root, what="--val", min_identities=2, min_per_identity=2)
    assert str(root) in msg and "at least 2" in msg and "2 or more images" in msg


def test_val_keeps_only_identities_with_two_images(tmp_path):
    root = make_identity_folder(tmp_path / "val", {"ann": 1, "bob": 2, "cid": 3})
    folder = scan_folder(root, min_identities=1, min_per_identity=2)
    assert folder.names == ["bob", "cid"]
    assert folder.labels.tolist() == [0, 0, 1, 1, 1]


# --- unreadable images --------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["on", "off"])
def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog, cache):
    root = make_identity_folder(tmp_path / "ds", {"ann": 2, "bob": 2, "cid": 2})
    bad = root / "bob" / "bob_9999.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    folder = scan_folder(root)
    assert len(folder) == 7  # scanning does not open files

    with caplog.at_level(logging.WARNING, logger="faceid.data"):
        kept, store = load_images(folder, 32, workers=0, cache=cache, what="--train")

    assert len(kept) == 6 and bad not in kept.paths
    assert [p for p, _ in kept.skipped] == [bad]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 unreadable image(s) of 7" in w and str(bad) in w for w in warnings), warnings
    assert kept.names == ["ann", "bob", "cid"]
    batch = store.batch(np.arange(len(kept)))
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.uint8
    assert (store.cached is not None) == (cache == "on")


def test_identity_left_without_images_after_skipping_counts(tmp_path):
    root = make_identity_folder(tmp_path / "ds", {"ann": 2})
    (root / "bob").mkdir()
    (root / "bob" / "broken.jpg").write_bytes(b"nope")
    folder = scan_folder(root)
    with pytest.raises(DataError, match="1 identity folder"):
        load_images(folder, 32, workers=0, cache="on", what="--train", min_identities=2)


def test_all_images_unreadable(tmp_path):
    for name in ("ann", "bob"):
        (tmp_path / "ds" / name).mkdir(parents=True)
        (tmp_path / "ds" / name / "x.jpg").write_bytes(b"nope")
    folder = scan_folder(tmp_path / "ds")
    with pytest.raises(DataError, match="none of the images could be read"):
        load_images(folder, 32, workers=0, cache="on", what="--train")


def test_decode_image_resizes_shorter_side_and_centre_crops(tmp_path):
    p = write_image(tmp_path / "wide.png", size=(80, 40))
    arr = decode_image(p, 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8


def _framed(size: tuple[int, int], inner: int) -> Image.Image:
    """Red image with a green square of side `inner` in its centre."""
    w, h = size
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 255, 0), ((w - inner) // 2, (h - inner) // 2, (w + inner) // 2, (h + inner) // 2))
    return img


def test_crop_keeps_only_the_centred_square_of_that_share_of_the_shorter_side():
    img = _framed((100, 60), 48)  # 48 = 0.8 x the shorter side
    whole = resize_center_crop(img, 16).astype(int)
    assert whole[0, :, 0].max() == 255  # the red frame shows at full view (shorter side resized)
    cropped = resize_center_crop(img, 16, 0.8).astype(int)
    assert cropped.shape == (3, 16, 16)
    assert cropped[1].min() >= 200 and cropped[0, 1:-1, 1:-1].max() == 0  # all green (edges blend slightly)
    tighter = resize_center_crop(img, 16, 0.5).astype(int)
    assert tighter[1].min() == 255 and tighter[0].max() == 0
    np.testing.assert_array_equal(resize_center_crop(img, 16, 1.0), whole)


def test_images_decode_and_cache_with_the_crop(tmp_path):
    folder_root = tmp_path / "ds"
    for name in ("ann", "bob"):
        (folder_root / name).mkdir(parents=True)
        _framed((80, 80), 56).save(folder_root / name / "a.png")
    folder = scan_folder(folder_root)
    _, store = load_images(folder, 16, workers=0, crop=0.5, cache="on", what="--train")
    _, lazy = load_images(folder, 16, workers=0, crop=0.5, cache="off", what="--train")
    assert store.crop == lazy.crop == 0.5
    for s in (store, lazy):
        x = s.batch([0, 1]).numpy().astype(int)
        assert x[:, 1].min() == 255 and x[:, 0].max() == 0  # only the green centre
    np.testing.assert_array_equal(decode_image(folder.paths[0], 16, 0.5), store.batch([0])[0].numpy())


# --- sample_pairs -------------------------------------------------------------------------------


def _skewed_labels() -> np.ndarray:
    # one big identity, a few medium ones, and singletons (no positive pair possible)
    counts = [200, 10, 6, 3, 2, 1, 1]
    return np.repeat(np.arange(len(counts)), counts)


@pytest.mark.parametrize("n_pairs", [1000, 1001, 2])
def test_sample_pairs_is_balanced_and_correct(n_pairs):
    labels = _skewed_labels()
    ia, ib, y = sample_pairs(labels, n_pairs, np.random.default_rng(0))
    assert len(ia) == len(ib) == len(y) == n_pairs
    assert int(y.sum()) == n_pairs // 2
    pos, neg = y == 1, y == 0
    assert (labels[ia[pos]] == labels[ib[pos]]).all()
    assert (ia[pos] != ib[pos]).all()  # two distinct images of the same person
    assert (labels[ia[neg]] != labels[ib[neg]]).all()


def test_sample_pairs_positives_are_spread_over_identities():
    labels = _skewed_labels()
    _, _, y = ia_ib_y = sample_pairs(labels, 4000, np.random.default_rng(1))
    ia = ia_ib_y[0]
    pos_ids = labels[ia[y == 1]]
    counts = np.bincount(pos_ids, minlength=7)
    # identities 0..4 have >= 2 images: about 400 each, despite identity 0 holding most images
    assert counts[5] == counts[6] == 0
    assert counts[:5].min() > 300 and counts[:5].max() < 500


def test_sample_pairs_is_deterministic_for_a_seed():
    labels = _skewed_labels()
    a = sample_pairs(labels, 500, np.random.default_rng(7))
    b = sample_pairs(labels, 500, np.random.default_rng(7))
    c = sample_pairs(labels, 500, np.random.default_rng(8))
    for x, z in zip(a, b):
        np.testing.assert_array_equal(x, z)
    assert not np.array_equal(a[0], c[0])


def test_sample_pairs_errors():
    with pytest.raises(DataError, match="2 or more images"):
        sample_pairs(np.array([0, 1, 2]), 10, np.random.default_rng(0))
    with pytest.raises(DataError, match="only one identity"):
        sample_pairs(np.array([0, 0, 0]), 10, np.random.default_rng(0))


# --- classification_batches ---------------------------------------------------------------------


def test_balanced_batches_draw_identities_uniformly():
    counts = [400, 40, 20, 10, 5, 3, 2, 2, 1, 1]  # heavily skewed
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(10):
        batches = classification_batches(labels, 16, rng, balanced=True)
        assert len(batches) == len(labels) // 16
        assert all(len(b) == 16 for b in batches)
        drawn.append(np.concatenate(batches))
    idx = np.concatenate(drawn)
    assert idx.min() >= 0 and idx.max() < len(labels)
    seen = np.bincount(labels[idx], minlength=len(counts))
    expected = len(idx) / len(counts)
    chi2 = float(((seen - expected) ** 2 / expected).sum())
    # 9 degrees of freedom: the 99.9% quantile is 27.9; the unbalanced draw is in the thousands
    assert chi2 < 27.9, (chi2, seen)
    # within an identity, its images are used, not just the first one
    # (about 480 draws over its 400 images: ~280 distinct expected)
    assert len(np.unique(idx[labels[idx] == 0])) > 200


def test_unbalanced_batches_are_a_permutation():
    counts = [400, 40, 20, 10, 5, 3, 2, 2, 1, 1]
    labels = np.repeat(np.arange(len(counts)), counts)
    batches = classification_batches(labels, 16, np.random.default_rng(0), balanced=False)
    idx = np.concatenate(batches)
    assert len(batches) == len(labels) // 16
    assert len(np.unique(idx)) == len(idx)  # no image twice in an epoch
    share0 = (labels[idx] == 0).mean()
    assert 0.8 < share0 < 0.9  # follows the skew (400 of 484 images)


def test_fewer_images_than_a_batch_still_gives_one_batch():
    labels = np.array([0, 0, 1, 1, 2])
    batches = classification_batches(labels, 16, np.random.default_rng(0), balanced=True)
    assert len(batches) == 1 and len(batches[0]) == 5


# --- BatchTransform -----------------------------------------------------------------------------


def test_batch_transform_normalises_to_float_channels_last():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tf = BatchTransform(torch.device("cpu"), augment=False, channels_last=True)
    out = tf(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(out, (x.float() - mean) / std)
    # the ImageNet mean colour maps to zero
    grey = (mean.round().clamp(0, 255).to(torch.uint8)).expand(1, 3, 8, 8).contiguous()
    assert tf(grey).abs().max() < 0.02


def test_batch_transform_without_channels_last_is_contiguous():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = BatchTransform(torch.device("cpu"), augment=False, channels_last=False)(x)
    assert out.is_contiguous()


def test_batch_transform_augmentation_keeps_shape_and_is_seeded():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    tf = BatchTransform(torch.device("cpu"), augment=True, channels_last=True)
    a = tf(x, torch.Generator().manual_seed(0))
    b = tf(x, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)
    plain = BatchTransform(torch.device("cpu"), augment=False, channels_last=True)(x)
    assert not torch.equal(a, plain)  # flips and shifts happened


def test_the_gathered_shift_a_gpu_uses_cuts_the_same_windows_as_the_slices():
    from faceid.data import shifted_windows

    g = torch.Generator().manual_seed(2)
    padded = torch.randint(0, 256, (12, 3, 40, 40), dtype=torch.uint8, generator=g)
    off = torch.randint(0, 9, (12, 2), generator=g)
    sliced = shifted_windows(padded, off, 32, gather=False)
    gathered = shifted_windows(padded, off, 32, gather=True)
    assert gathered.shape == (12, 3, 32, 32) and gathered.is_contiguous()
    assert torch.equal(sliced, gathered)
    dy, dx = off[5].tolist()
    assert torch.equal(gathered[5], padded[5, :, dy : dy + 32, dx : dx + 32])


def test_batch_transform_flip_only_mirrors_some_images_and_shifts_none():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    plain = BatchTransform(torch.device("cpu"), augment=False, channels_last=False)(x)
    out = BatchTransform(torch.device("cpu"), augment=True, shift=False, channels_last=False)(
        x, torch.Generator().manual_seed(1)
    )
    same = [torch.equal(out[i], plain[i]) for i in range(16)]
    mirrored = [torch.equal(out[i], plain[i].flip(2)) for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored))  # each image as it was, or its mirror
    assert any(same) and any(mirrored)
