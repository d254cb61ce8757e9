"""faceid.pairs: the LFW pairs.txt protocol, on tiny files written per test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from faceid.errors import DataError
from faceid.pairs import PairsProtocol, identities_in, load_pairs, load_protocol, resolve_pairs_file


def _touch(root: Path, name: str, idx: int, ext: str = ".jpg") -> Path:
    p = root / name / f"{name}_{idx:04d}{ext}"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"not really an image")
    return p


# Two folds of 2 matched + 2 mismatched pairs, tab separated like the real file.
TWO_FOLDS = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tBob\t2
Cid\t1\tDee\t1
Bob\t2\t3
Cid\t1\t2
Dee\t1\tAnn\t2
Eve\t1\tBob\t1
"""

IMAGES = [
    ("Ann", 1),
    ("Ann", 2),
    ("Bob", 1),
    ("Bob", 2),
    ("Bob", 3),
    ("Cid", 1),
    ("Cid", 2),
    ("Dee", 1),
    ("Eve", 1),
]


@pytest.fixture
def lfw(tmp_path: Path) -> Path:
    """A tiny LFW-style folder with TWO_FOLDS as pairs.txt; returns the pairs file."""
    for name, idx in IMAGES:
        _touch(tmp_path, name, idx)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(TWO_FOLDS)
    return pairs


def test_two_fold_file(lfw: Path):
    root = lfw.parent
    p = load_pairs(lfw)
    assert isinstance(p, PairsProtocol)
    assert len(p) == 8 and p.n_folds == 2 and p.source == lfw
    assert p.labels.tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert p.folds.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert p.labels.dtype.kind == "i" and p.folds.dtype.kind == "i"
    assert p.paths_a[0] == root / "Ann" / "Ann_0001.jpg"
    assert p.paths_b[0] == root / "Ann" / "Ann_0002.jpg"
    assert p.paths_a[3] == root / "Cid" / "Cid_0001.jpg"
    assert p.paths_b[3] == root / "Dee" / "Dee_0001.jpg"
    assert identities_in(p) == {"Ann", "Bob", "Cid", "Dee", "Eve"}


def test_unique_paths_and_index_pairs(lfw: Path):
    p = load_pairs(lfw)
    uniq = p.unique_paths()
    assert len(uniq) == len(set(uniq)) == len(IMAGES)
    # Stable: order of first use, a before b.
    assert [u.stem for u in uniq[:4]] == ["Ann_0001", "Ann_0002", "Bob_0001", "Bob_0003"]
    index = {path: i for i, path in enumerate(uniq)}
    ia, ib = p.index_pairs(index)
    assert ia.shape == ib.shape == (8,)
    assert [uniq[i] for i in ia] == p.paths_a
    assert [uniq[i] for i in ib] == p.paths_b
    with pytest.raises(ValueError, match="no embedding index"):
        p.index_pairs({})


def test_fold_selection(lfw: Path):
    p = load_pairs(lfw, folds=[2])
    assert len(p) == 4
    assert p.folds.tolist() == [2, 2, 2, 2]
    assert p.labels.tolist() == [1, 1, 0, 0]
    assert p.paths_a[0].name == "Bob_0002.jpg"
    assert identities_in(p) == {"Bob", "Cid", "Dee", "Ann", "Eve"}
    assert len(load_pairs(lfw, folds=[1, 2])) == 8


@pytest.mark.parametrize("bad", [[3], [0], [1, 5]])
def test_fold_out_of_range(lfw: Path, bad):
    with pytest.raises(DataError) as e:
        load_pairs(lfw, folds=bad)
    msg = str(e.value)
    assert str(lfw) in msg and "1..2" in msg and "out of range" in msg


def test_single_set_header_and_spaces(tmp_path: Path):
    for name, idx in [("Ann", 1), ("Ann", 2), ("Bob", 1), ("Bob", 2)]:
        _touch(tmp_path, name, idx)
    f = tmp_path / "pairsDevTrain.txt"
    f.write_text("2\nAnn 1 2\nBob  1   2\nAnn 1 Bob 1\n\nBob 2 Ann 2\n\n")
    p = load_pairs(f)
    assert p.n_folds == 1
    assert p.labels.tolist() == [1, 1, 0, 0]
    assert p.folds.tolist() == [1, 1, 1, 1]
    assert p.paths_b[3] == tmp_path / "Ann" / "Ann_0002.jpg"


def test_explicit_root_and_extensions(tmp_path: Path):
    images = tmp_path / "images"
    _touch(images, "Ann", 1, ".png")
    _touch(images, "Ann", 1, ".jpg")  # preferred over the .png
    _touch(images, "Ann", 2, ".webp")
    _touch(images, "Bob", 1, ".JPEG")
    _touch(images, "Bob", 2, ".bmp")
    _touch(images, "Bob", 3, ".txt")  # not an image: does not count
    f = tmp_path / "protocol" / "pairs.txt"
    f.parent.mkdir()
    f.write_text("1\nAnn 1 2\nAnn 2 Bob 1\n")
    p = load_pairs(f, root=images)
    assert [x.name for x in p.paths_a] == ["Ann_0001.jpg", "Ann_0002.webp"]
    assert [x.name for x in p.paths_b] == ["Ann_0002.webp", "Bob_0001.JPEG"]
    f.write_text("1\nBob 2 3\nAnn 2 Bob 1\n")
    with pytest.raises(DataError, match="Bob_0003"):
        load_pairs(f, root=images)


# ----------------------------------------------------------------------------------------------
# Errors name the file, the line and the fix


def _write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "pairs.txt"
    f.write_text(text)
    return f


@pytest.mark.parametrize("header", ["a b", "1 2 3", "0", "2 -1"])
def test_bad_header(tmp_path: Path, header):
    f = _write(tmp_path, header + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(f)
    msg = str(e.value)
    assert str(f) in msg and "line 1" in msg and "header" in msg


def test_empty_file(tmp_path: Path):
    f = _write(tmp_path, "\n\n")
    with pytest.raises(DataError, match="empty"):
        load_pairs(f)


def test_missing_pairs_file(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.txt")


def test_matched_line_with_wrong_field_count(lfw: Path):
    lines = TWO_FOLDS.splitlines()
    lines[2] = "Bob\t1\tAnn\t3"  # line 3 should be a matched pair
    lfw.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(lfw)
    msg = str(e.value)
    assert f"{lfw}, line 3" in msg and "matched pair 'name idx1 idx2'" in msg


def test_mismatched_line_with_wrong_field_count(lfw: Path):
    lines = TWO_FOLDS.splitlines()
    lines[8] = "Eve\t1\t2"  # line 9: the last mismatched pair of fold 2
    lfw.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(lfw)
    msg = str(e.value)
    assert f"{lfw}, line 9" in msg and "mismatched pair" in msg and "fold 2" in msg


def test_line_numbers_count_blank_lines(lfw: Path):
    lines = TWO_FOLDS.splitlines()
    lines[1] = "Ann\tone\t2"
    lfw.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(lfw)
    assert f"{lfw}, line 3" in str(e.value) and "'one'" in str(e.value)


def test_wrong_number_of_lines(lfw: Path):
    lfw.write_text("\n".join(TWO_FOLDS.splitlines()[:-1]) + "\n")
    with pytest.raises(DataError) as e:
        load_pairs(lfw)
    msg = str(e.value)
    assert str(lfw) in msg and "8 lines" in msg and "7 pair lines" in msg


def test_missing_images_are_counted(lfw: Path):
    root = lfw.parent
    (root / "Eve" / "Eve_0001.jpg").unlink()
    (root / "Cid" / "Cid_0002.jpg").unlink()
    with pytest.raises(DataError) as e:
        load_pairs(lfw)
    msg = str(e.value)
    assert str(lfw) in msg
    assert "2 image file(s)" in msg
    assert "line 7" in msg and str(root / "Cid" / "Cid_0002") in msg
    assert "line 9" in msg and "Eve_0001" in msg
    # Fold 1 does not use them: it still loads.
    assert len(load_pairs(lfw, folds=[1])) == 4


def test_missing_identity_folder(lfw: Path, tmp_path: Path):
    with pytest.raises(DataError, match="image file\\(s\\).*missing"):
        load_pairs(lfw, root=tmp_path / "elsewhere")


# ----------------------------------------------------------------------------------------------
# Found with a --val folder: the rule of `faceid train` and `faceid evaluate`


def test_a_relative_pairs_file_not_found_is_taken_relative_to_val(lfw: Path, tmp_path: Path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    val = lfw.parent
    assert resolve_pairs_file("pairs.txt", val) == val / "pairs.txt"
    p = load_protocol("pairs.txt", val)
    assert p.source == val / "pairs.txt" and p.paths_a[0] == val / "Ann" / "Ann_0001.jpg"
    assert resolve_pairs_file(lfw, tmp_path / "other") == lfw  # absolute: as given
    assert resolve_pairs_file("pairs.txt") == Path("pairs.txt")  # no --val: as given
    (cwd / "pairs.txt").write_text(TWO_FOLDS)
    assert resolve_pairs_file("pairs.txt", val) == Path("pairs.txt")  # found where given: that one


def test_images_beside_the_pairs_file_else_under_val(lfw: Path, tmp_path: Path):
    protocol = tmp_path / "protocol" / "pairs.txt"
    protocol.parent.mkdir()
    protocol.write_text(TWO_FOLDS)
    p = load_protocol(protocol, lfw.parent)  # no images beside it: those under --val
    assert p.source == protocol and p.paths_a[0] == lfw.parent / "Ann" / "Ann_0001.jpg"
    assert load_protocol(lfw, tmp_path / "nowhere").paths_a[0] == lfw.parent / "Ann" / "Ann_0001.jpg"
    with pytest.raises(DataError, match="missing under"):
        load_protocol(protocol)  # no --val to fall back on
    with pytest.raises(DataError, match="missing under"):
        load_protocol(protocol, lfw.parent, root=tmp_path / "nowhere")  # a root given is the only place
    assert len(load_protocol(protocol, lfw.parent, folds=[2])) == 4


# ----------------------------------------------------------------------------------------------
# The real LFW, when present


@pytest.mark.skipif(not os.environ.get("FACEID_LFW_DIR"), reason="FACEID_LFW_DIR is not set")
def test_real_lfw_pairs():
    root = Path(os.environ["FACEID_LFW_DIR"])
    p = load_pairs(root / "pairs.txt")
    assert len(p) == 6000
    assert int(p.labels.sum()) == 3000
    assert p.n_folds == 10
    assert np.bincount(p.folds).tolist() == [0] + [600] * 10
    for f in range(1, 11):
        assert int(p.labels[p.folds == f].sum()) == 300
    assert all(x.is_file() for x in p.unique_paths())
    one = load_pairs(root / "pairs.txt", folds=[1])
    assert len(one) == 600 and set(one.folds.tolist()) == {1}
