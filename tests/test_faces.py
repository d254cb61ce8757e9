"""Faces in photos: detection (five landmarks), alignment onto the ArcFace template, the face
cache, and training and embedding with aligned faces.

Scene photos are made from real faces (the shipped sample; LFW too when FACEID_LFW_DIR is set):
each face pasted at a random scale, place and in-plane rotation of up to 30 degrees onto a
cluttered background (faceid.scenes), with scenes of no face and of two faces."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from core_fixtures import SAMPLE_TRAIN, SAMPLE_VAL, TINY, small_sample, tiny_aligned_run, write_image
from PIL import Image

from faceid.data import scan_folder
from faceid.errors import DataError, ImageError
from faceid.facecache import FaceCache, find_faces
from faceid.faces import (
    ARCFACE_POINTS,
    LEGACY_NMS,
    LEGACY_SHRINK,
    DetectorSpec,
    NoFaceError,
    Photo,
    Preparation,
    align_face,
    align_scale,
    aligned_crop,
    build_detector,
    shrink_for_detection,
    template_points,
)
from faceid.imagestore import load_images
from faceid.scenes import make_scene, pasted_side


def _faces(n: int) -> list[Path]:
    """n real face crops of different people: the sample's, then LFW's when it is there."""
    people = sorted(d for d in SAMPLE_VAL.iterdir() if d.is_dir())
    files = [sorted(d.glob("*.jpg"))[0] for d in people]
    lfw = os.environ.get("FACEID_LFW_DIR")
    if lfw and Path(lfw).is_dir():
        names = sorted(d for d in Path(lfw).iterdir() if d.is_dir())[::400]
        files += [sorted(d.glob("*.jpg"))[0] for d in names]
    return files[:n]


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)
    return build_detector(DetectorSpec())


def _eye_angle(face) -> float:
    """The eye line's angle in degrees, counter-clockwise as Pillow's rotate."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return -math.degrees(math.atan2(ry - ly, rx - lx))


def test_detects_the_pasted_face_where_and_as_turned_as_it_was_pasted(detector):
    rng = np.random.default_rng(7)
    files = _faces(24)
    turns = []
    for f in files:
        face = Image.open(f).convert("RGB")
        upright = _eye_angle(detector.detect([face])[0][0])  # the head's own tilt in the crop
        scene, (placed,) = make_scene([face], rng)
        found = detector.detect([scene])[0]
        assert found, f"no face found in the scene made from {f}"
        best = found[0]
        x1, y1, x2, y2 = best.box
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        # LFW crops are centred on the face: the box centre is near the pasted crop's centre
        assert math.dist(centre, placed.center) < 0.2 * placed.side, (f, centre, placed)
        # the box covers the face, not the whole pasted crop nor a speck
        assert 0.3 * placed.side < x2 - x1 < 1.1 * placed.side
        # the eyes are turned as the crop was: within a few degrees on average, and never far off
        # (the hardest of these faces is about 8 to 11 degrees off, whichever way it is shrunk)
        turns.append(abs(_eye_angle(best) - upright - placed.angle))
        assert turns[-1] < 15, (f, _eye_angle(best), upright, placed.angle)
        assert 0.9 <= best.score <= 1.0
    assert np.mean(turns) < 3, turns


def test_a_scene_without_a_face_has_none_and_a_scene_with_two_has_both(detector):
    rng = np.random.default_rng(3)
    for _ in range(6):
        scene, _ = make_scene([], rng)
        assert detector.detect([scene])[0] == []
    a, b = (Image.open(f) for f in _faces(2))
    scene, placed = make_scene([a, b], rng, size=(800, 500), side_range=(0.3, 0.45))
    found = detector.detect([scene])[0]
    assert len(found) == 2
    assert found[0].area >= found[1].area  # largest first
    centres = [((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2) for f in found]
    for p in placed:
        assert min(math.dist(c, p.center) for c in centres) < 0.2 * p.side


def test_a_scene_says_where_each_point_of_the_pasted_crop_went():
    """Placed.to_scene follows the crop's scaling, turn and paste: four coloured squares of a crop
    are found in the scene where it says, at every angle (a turn left out would miss them)."""
    colours = {(25, 25): (255, 0, 0), (75, 25): (0, 255, 0), (25, 75): (0, 0, 255), (75, 75): (255, 255, 0)}
    crop = np.full((100, 100, 3), 128, dtype=np.uint8)
    for (x, y), c in colours.items():
        crop[y - 8 : y + 8, x - 8 : x + 8] = c
    rng = np.random.default_rng(4)
    angles = []
    for _ in range(6):
        scene, (placed,) = make_scene([Image.fromarray(crop)], rng, size=(600, 400), side_range=(0.5, 0.5))
        pixels = np.asarray(scene, dtype=np.int64)
        where = placed.to_scene(list(colours), (100, 100))
        for (x, y), c in zip(np.rint(where).astype(int), colours.values()):
            assert np.abs(pixels[y, x] - c).max() < 40, (placed, (x, y), pixels[y, x], c)
        angles.append(abs(placed.angle))
    assert max(angles) > 15  # the squares' centres moved by tens of pixels in the turn
    # the mapping of a non-square crop scales each axis by its own size
    one = make_scene([Image.fromarray(crop[:, :50])], np.random.default_rng(0), max_angle=0)[1][0]
    side = pasted_side(one.side)
    np.testing.assert_allclose(one.to_scene([[24.5, 49.5]], (50, 100))[0], np.asarray(one.center) - 0.5, atol=1e-9)
    assert one.to_scene([[49.5, 49.5]], (50, 100))[0][0] - one.to_scene([[-0.5, 49.5]], (50, 100))[0][0] == side


def test_the_landmarks_of_a_scene_file_are_the_crops_own_where_the_paste_put_them(detector, tmp_path):
    """A large scene photo read as training and the server read it (faceid.faces.Photo: the JPEG
    decoded at half size and searched at the detector's scale, the landmarks given in the photo's own pixels) gives
    the landmarks found in the face crop itself, carried through the paste, within a few percent
    of the eye distance (bench/README.md, landmark_error, measures the same over 300 faces)."""
    rng = np.random.default_rng(12)
    errors = []
    for f in _faces(12):
        crop = Image.open(f).convert("RGB")
        (own, *_) = detector.detect([crop])[0]
        scene, (placed,) = make_scene([crop], rng, size=(1280, 960), side_range=(0.25, 0.45))
        path = tmp_path / f"{f.stem}.jpg"
        scene.save(path, quality=90)
        photo = Photo.open(path, detector.spec.max_side)
        assert photo.scale == 2 and photo.full_size == (1280, 960)
        truth = placed.to_scene(own.landmarks, crop.size)
        eyes = math.dist(truth[0], truth[1])
        gaps = [np.linalg.norm(np.asarray(face.landmarks) - truth, axis=1).mean() for face in photo.faces(detector)]
        assert gaps, f"no face found in the scene made from {f}"
        errors.append(min(gaps) / eyes)
    # each face is found (its landmarks within half the eye distance; one hard face, a blurred and
    # tilted head, is off by about 0.4 of it) and most precisely
    assert max(errors) < 0.5 and np.mean(errors) < 0.08 and np.median(errors) < 0.06, errors


def _test_photos() -> list[Image.Image]:
    """Photos of every kind the detector meets: crops of two sizes, scenes with one face and with
    two, one without, and one smaller than the P-net's window."""
    rng = np.random.default_rng(11)
    faces = [Image.open(f).convert("RGB") for f in _faces(4)]
    two, _ = make_scene(faces[:2], rng, size=(640, 400), side_range=(0.3, 0.45))
    return [
        faces[0],
        faces[1].resize((131, 117)),  # another size: another pyramid
        make_scene([faces[2]], rng, size=(480, 360))[0],
        two.resize((480, 300)),
        make_scene([], rng, size=(480, 360))[0],  # none
        Image.new("RGB", (10, 40)),  # smaller than the P-net's window
        faces[3],
    ]


def test_one_batched_call_finds_exactly_what_facenet_pytorch_finds_photo_by_photo():
    """The batched MTCNN (faceid.mtcnn) reads its pyramid and crops off integral images and runs the
    R- and O-nets over all photos at once; with facenet-pytorch's overlaps (the specs recorded
    before the overlaps were a setting), its own detect_face, one photo at a time, must find the
    same boxes, scores and landmarks, with its own nets."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    from facenet_pytorch.models.utils.detect_face import detect_face

    photos = _test_photos()
    spec = DetectorSpec.from_json({})  # a record without the overlaps: the legacy ones
    assert spec.nms == LEGACY_NMS and spec.key == "mtcnn-480-40-0.9-0.6-0.7-0.8-0.8"
    mtcnn = build_detector(spec).mtcnn
    batched = mtcnn.detect(photos)
    assert [len(b) for b, _ in batched] == [1, 1, 1, 2, 0, 0, 1]
    nets = (PNet().eval(), RNet().eval(), ONet().eval())
    for photo, (boxes, points) in zip(photos, batched):
        if min(photo.size) < 12:
            continue
        arr = torch.from_numpy(np.array(photo, dtype=np.uint8)[None])
        with torch.inference_mode():
            ref_boxes, ref_points = detect_face(arr, spec.min_face, *nets, list(spec.thresholds), spec.factor, "cpu")
        ref_boxes = np.asarray(ref_boxes[0], dtype=np.float64).reshape(-1, 5)
        ref_points = np.asarray(ref_points[0], dtype=np.float64).reshape(-1, 5, 2)
        order, ref_order = np.argsort(boxes[:, 0]), np.argsort(ref_boxes[:, 0])
        np.testing.assert_allclose(boxes[order], ref_boxes[ref_order], atol=1e-4)
        np.testing.assert_allclose(points[order], ref_points[ref_order], atol=1e-4)


def test_the_widened_p_net_computes_facenet_pytorchs_numbers_bit_for_bit():
    """faceid.mtcnn gives the P-net's first layer six channels of zeros (faster in channels_last):
    on a CPU its outputs must be the original net's exactly, at every pyramid level's size."""
    from facenet_pytorch.models.mtcnn import PNet

    from faceid.mtcnn import _nets

    widened = _nets(torch.device("cpu"))[0]
    assert widened.conv1.out_channels == 16
    original = PNet().eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    for h, w in [(12, 12), (14, 19), (65, 87), (108, 145), (301, 402)]:
        x = ((torch.rand(2, h, w, 3, generator=g) * 255).round() - 127.5) * 0.0078125
        x = x.permute(0, 3, 1, 2)  # channels_last's layout, as the detector feeds it
        with torch.inference_mode():
            for got, want in zip(widened(x), original(x)):
                assert torch.equal(got, want), (h, w)


def test_a_large_photo_is_searched_in_its_own_pixels_at_the_detectors_scale(detector, monkeypatch):
    """The default spec ("pyramid") searches a photo above max_side at max_side's scales but reads
    the pyramid and the nets' crops off the photo's own pixels: the face of an 840x630 scene is
    where it is found in the same scene resized to 480x360 (the legacy "resize" spec), given in
    the large photo's pixels, with its landmarks where the paste put them."""
    legacy = DetectorSpec.from_json({"nms": [0.4, 0.4]})  # a record without `shrink`
    assert legacy.shrink == LEGACY_SHRINK == "resize" and legacy.key == "mtcnn-480-40-0.9-0.6-0.7-0.8-0.8-nms0.4-0.4"
    assert detector.spec.shrink == "pyramid" and detector.spec.key == legacy.key + "-pyramid"
    assert DetectorSpec.from_json(detector.spec.to_json()) == detector.spec
    with pytest.raises(ValueError, match="pyramid, resize"):
        DetectorSpec.from_json({"shrink": "lanczos"})
    # what each spec searches a photo in: reduced by a whole factor, or resized to max_side
    big = Image.new("RGB", (1500, 1000))
    assert shrink_for_detection(big, detector.spec) == (big.reduce(3), 3.0)  # 500x334: still above 480
    assert shrink_for_detection(big, legacy)[0].size == (480, 320)
    assert shrink_for_detection(big.resize((900, 600)), detector.spec)[0].size == (900, 600)

    resized = build_detector(legacy)
    rng = np.random.default_rng(21)
    errors = []
    for f in _faces(8):
        crop = Image.open(f).convert("RGB")
        (own, *_) = detector.detect([crop])[0]
        scene, (placed,) = make_scene([crop], rng, size=(840, 630), side_range=(0.2, 0.4))
        truth = placed.to_scene(own.landmarks, crop.size)
        eyes = math.dist(truth[0], truth[1])
        (found, *_) = detector.detect([scene])[0]
        (coarse, *_) = resized.detect([scene])[0]
        # the same face, in the same (full-size) pixels
        assert math.dist(found.box[:2], coarse.box[:2]) < 0.1 * placed.side
        assert math.dist(found.box[2:], coarse.box[2:]) < 0.1 * placed.side
        errors.append(np.linalg.norm(np.asarray(found.landmarks) - truth, axis=1).mean() / eyes)
    # its landmarks where the paste put them (bench/README.md, landmark_error, compares both specs)
    assert max(errors) < 0.5 and np.mean(errors) < 0.06, errors
    # and at the same scales: the pyramid's levels are as large in both
    import faceid.mtcnn

    levels: list[tuple[int, int]] = []
    real = faceid.mtcnn._shrunk
    monkeypatch.setattr(faceid.mtcnn, "_shrunk", lambda sums, size: levels.append(size) or real(sums, size))
    detector.detect([scene])
    own_levels, levels[:] = list(levels), []
    resized.detect([scene])
    assert len(own_levels) == len(levels) == 5
    assert all(abs(a - b) <= 1 for own, coarse in zip(own_levels, levels) for a, b in zip(own, coarse)), levels


def test_the_default_overlaps_send_fewer_candidates_on_and_find_the_same_faces(detector, monkeypatch):
    """The default spec drops overlapping candidates sooner than facenet-pytorch does: the R- and
    O-nets see fewer of them, and the same faces come out, each landmark within a few pixels."""
    photos = _test_photos()
    mtcnn = detector.mtcnn
    assert detector.spec.nms != LEGACY_NMS and detector.spec.key != DetectorSpec.from_json({}).key
    seen: dict[str, list[int]] = {"rnet": [], "onet": []}
    for name in seen:
        net = getattr(mtcnn, name)
        monkeypatch.setattr(net, "forward", lambda x, f=net.forward, n=name: seen[n].append(len(x)) or f(x))
    before = mtcnn.detect(photos, LEGACY_NMS)
    after = mtcnn.detect(photos, detector.spec.nms)
    assert seen["rnet"][1] < 0.75 * seen["rnet"][0] and seen["onet"][1] < 0.5 * seen["onet"][0]
    for (b0, p0), (b1, p1) in zip(before, after):
        assert len(b1) == len(b0)
        if len(b0):
            o0, o1 = np.argsort(b0[:, 0]), np.argsort(b1[:, 0])
            sides = (b0[o0, 2] - b0[o0, 0])[:, None, None]
            assert (np.abs(p1[o1] - p0[o0]) / sides).max() < 0.06  # a few pixels on faces 50-200 px wide


def test_one_or_two_photos_are_searched_on_one_compute_thread_and_the_setting_comes_back(detector):
    """On a CPU, as for the forward pass (faceid.runtime.ONE_THREAD_MAX_IMAGES): one or two photos
    are searched on one compute thread, more on all of them."""
    photos = [Image.open(f).convert("RGB") for f in _faces(3)]
    seen: list[int] = []
    hook = detector.mtcnn.pnet.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n in (1, 2, 3):
            seen.clear()
            assert all(detector.detect(photos[:n]))
            assert set(seen) == ({1} if n <= 2 else {2}), (n, seen)
            assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_a_photo_the_cheaper_search_finds_no_face_in_is_searched_again_with_the_legacy_overlaps(detector, monkeypatch):
    photos = _test_photos()
    assert [len(f) for f in detector.detect(photos)] == [1, 1, 1, 2, 0, 0, 1]
    real = detector.mtcnn.detect
    calls: list[tuple[int, tuple]] = []

    def losing(images, nms, max_side=0):
        calls.append((len(images), tuple(nms)))
        found = real(images, nms, max_side)
        if tuple(nms) != LEGACY_NMS:  # the cheaper search loses the first photo's face
            found[0] = (found[0][0][:0], found[0][1][:0])
        return found

    monkeypatch.setattr(detector.mtcnn, "detect", losing)
    faces = detector.detect(photos)
    assert [len(f) for f in faces] == [1, 1, 1, 2, 0, 0, 1]
    # once all photos, then only those without a face (the lost one, the faceless and the tiny)
    assert calls == [(7, detector.spec.nms), (3, LEGACY_NMS)]
    assert faces[0] == detector._faces([(photos[0], 1.0)], LEGACY_NMS)[0]
    monkeypatch.undo()
    # a sample photo where it happens without help (its best candidates dropped, the rest scored
    # below min_score): its face is found
    britney = Image.open(SAMPLE_TRAIN / "Britney_Spears" / "Britney_Spears_0005.jpg").convert("RGB")
    assert len(detector.detect([britney])[0]) == 1


def test_the_integral_image_gives_area_resizing_exactly_and_does_not_overflow():
    from faceid.mtcnn import _integral, _shrunk

    rng = np.random.default_rng(6)
    photos = rng.integers(0, 256, (2, 97, 131, 3), dtype=np.uint8)
    sums = _integral(photos)
    assert sums.dtype == np.int32
    for size in ((40, 53), (12, 17), (97, 131), (29, 131)):
        area = torch.nn.functional.interpolate(
            torch.from_numpy(photos).permute(0, 3, 1, 2).float(), size=size, mode="area"
        ).permute(0, 2, 3, 1)
        assert torch.equal(torch.from_numpy(_shrunk(sums, size)), area), size
    white = np.full((1, 3000, 3000, 3), 255, dtype=np.uint8)  # sums past int32
    big = _integral(white)
    assert big.dtype == np.int64 and big[0, -1, -1, 0] == 255 * 3000 * 3000


def test_alignment_puts_the_landmarks_on_the_template():
    # A picture whose five landmarks are exactly the template's comes out unchanged at 112 px
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    out = align_face(img, ARCFACE_POINTS, 112)
    assert np.abs(out.astype(int) - np.asarray(img).transpose(2, 0, 1).astype(int)).mean() < 1.0
    # The same picture turned by 25 degrees, scaled by 3 and moved: aligning it undoes that
    angle, scale = math.radians(25), 3.0
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
    shift = np.array([200.0, 150.0])
    big = Image.new("RGB", (700, 700))
    inverse = np.linalg.inv(np.vstack([np.hstack([rot, shift[:, None]]), [0, 0, 1]]))
    big = img.transform((700, 700), Image.AFFINE, tuple(inverse[:2].ravel()), Image.BILINEAR)
    moved = ARCFACE_POINTS @ rot.T + shift
    back = align_face(big, moved, 112)
    inner = (slice(None), slice(8, 104), slice(8, 104))  # the warped picture's edges are black
    diff = np.abs(back[inner].astype(int) - np.asarray(img).transpose(2, 0, 1)[inner].astype(int)).mean()
    assert diff < 40  # random pixels resampled twice; an unaligned crop differs by ~85
    # scaled to img_size, and crop keeps the centred share of the template's square
    assert np.allclose(template_points(56), ARCFACE_POINTS / 2)
    t = template_points(100, crop=0.5)
    assert np.allclose(t - 50, (ARCFACE_POINTS - 56) * 100 / 56)


def test_aligned_crops_of_a_face_and_of_its_turned_copy_in_a_scene_embed_close_together(detector):
    """With any fixed network (here an untrained ResNet-18), the aligned crop of a face found in a
    scene embeds nearest to the aligned crop of the original photo, among 12 people; the centre
    crop of the same scene does not."""
    from torchvision.models import resnet18

    from faceid.data import resize_center_crop

    torch.manual_seed(0)
    net = resnet18(num_classes=128).eval()

    def embed(arrays: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrays)).float() / 255.0
        with torch.inference_mode():
            return net((x - x.mean(dim=(0, 2, 3), keepdim=True)) / 0.25)

    rng = np.random.default_rng(11)
    refs, moved, plain = [], [], []
    for f in _faces(12):
        face = Image.open(f).convert("RGB")
        refs.append(align_face(face, detector.detect([face])[0][0].landmarks, 112))
        scene, _ = make_scene([face], rng, max_angle=30)
        moved.append(align_face(scene, detector.detect([scene])[0][0].landmarks, 112))
        plain.append(resize_center_crop(scene, 112))
    r, m, p = embed(refs), embed(moved), embed(plain)
    centre = r.mean(0)

    def cosines(a: torch.Tensor) -> torch.Tensor:  # [12 probes, 12 references]
        a = torch.nn.functional.normalize(a - centre, dim=1)
        return a @ torch.nn.functional.normalize(r - centre, dim=1).T

    aligned, unaligned = cosines(m), cosines(p)
    assert (aligned.argmax(1) == torch.arange(12)).sum() >= 10, aligned.argmax(1)
    assert aligned.diagonal().mean() > unaligned.diagonal().mean() + 0.3
    assert (unaligned.argmax(1) == torch.arange(12)).sum() <= 4


def test_the_face_cache_detects_each_file_once_and_again_only_when_it_changes(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    for i, f in enumerate(_faces(4)):
        files.append(Path(shutil.copy(f, folder / f"{i}.jpg")))
    write_image(folder / "noise.png", seed=1, size=(80, 80))
    files.append(folder / "noise.png")
    spec = DetectorSpec()
    cache_dir = tmp_path / "cache"
    first = find_faces(files, spec, folder=cache_dir)
    assert [bool(f) for f in first] == [True, True, True, True, False]

    calls: list[int] = []
    import faceid.facecache as facecache

    real = facecache.build_detector

    class Counting:
        def __init__(self, inner):
            self.inner, self.spec = inner, inner.spec

        def detect(self, images):
            calls.append(len(images))
            return self.inner.detect(images)

    monkeypatch.setattr(facecache, "build_detector", lambda s, device="cpu": Counting(real(s, device)))
    again = find_faces(files, spec, folder=cache_dir)
    assert calls == [] and again == first
    # one file changes (another face copied over it): only it is detected again
    shutil.copy(files[0], files[1])
    os.utime(files[1], ns=(1, 1))
    changed = find_faces(files, spec, folder=cache_dir)
    assert calls == [1]
    assert changed[2:] == first[2:]
    # the copy, detected alone, as its original was in a group (the nets' arithmetic differs a
    # little with the batch they run in)
    (a,), (b,) = changed[1], changed[0]
    np.testing.assert_allclose(
        [*a.box, *np.ravel(a.landmarks), a.score], [*b.box, *np.ravel(b.landmarks), b.score], atol=1e-3
    )
    # other detector settings have a cache of their own
    other = DetectorSpec(min_score=0.95)
    find_faces(files, other, folder=cache_dir)
    assert calls[1:] == [len(files)]  # found together: one detector call for up to DETECT_CHUNK files
    assert FaceCache(other, cache_dir).path != FaceCache(spec, cache_dir).path


def test_finer_searches_share_a_few_detection_sizes():
    """min_face asks for a percent of the photo; the detection side it gives is rounded up to one
    of a few sizes, so that no run of odd percents builds a detector for each (each is kept)."""
    from faceid.faces import least_min_face, search_spec

    spec = DetectorSpec()
    assert search_spec(spec, None) is spec and search_spec(spec, 10) is spec and search_spec(spec, 8.4) is spec
    assert search_spec(spec, 2).max_side == 2000 and search_spec(spec, 3).max_side == 1440
    sides = {search_spec(spec, p).max_side for p in np.linspace(2, 8.3, 2000)}
    assert sides == {640, 800, 960, 1120, 1280, 1440, 1600, 1760, 1920, 2000}
    assert all(search_spec(spec, p).min_face == spec.min_face for p in (2, 5))
    assert least_min_face(spec) == 2.0


def test_coarser_searches_start_the_pyramid_at_larger_faces_and_still_reach_the_percent_asked():
    """min_face above the model's own share (about 8%): the photo is shrunk as the model's detection
    shrinks it, and the pyramid starts at a larger face, rounded down to a few sizes so that every
    face down to the percent asked is still searched for."""
    from dataclasses import replace

    from faceid.faces import search_spec, smallest_face_percent

    spec = DetectorSpec()
    coarse = {p: search_spec(spec, p) for p in np.linspace(8.4, 100, 2000)}
    assert all(s.max_side == spec.max_side and s.shrink == spec.shrink for s in coarse.values())
    assert all(smallest_face_percent(s) <= p + 1e-9 for p, s in coarse.items())
    assert {s.min_face for s in coarse.values()} == set(range(40, 481, 20))
    assert search_spec(spec, 12.5).min_face == 60 and search_spec(spec, 25).min_face == 120
    assert search_spec(spec, 12.4) is spec  # 59.5 px: the model's own 40 px is the coarsest that reaches it
    legacy = DetectorSpec.from_json({})
    assert search_spec(legacy, 25) == replace(legacy, min_face=120)


def _face_filling(size: tuple[int, int]) -> Image.Image:
    """A sample face crop scaled to fill the shorter side of a plain photo of `size`, centred."""
    face = Image.open(_faces(1)[0]).convert("RGB")
    side = min(size)
    photo = Image.new("RGB", size, (90, 100, 110))
    photo.paste(face.resize((side, side)), ((size[0] - side) // 2, (size[1] - side) // 2))
    return photo


def test_a_photo_smaller_than_the_smallest_face_searched_is_searched_at_its_own_size(detector, tmp_path):
    """A thumbnail whose shorter side is below min_face, and a search for large faces only in a
    small or a wide photo, have no pyramid level at min_face: the photo is searched for the largest
    face it can hold, its shorter side, in a batch with others and in a training folder alike."""
    from faceid.faces import search_spec

    photos = [_face_filling(s) for s in ((20, 20), (30, 30), (39, 39), (154, 154))]
    found = detector.detect(photos)
    for photo, faces in zip(photos, found):
        assert len(faces) == 1, photo.size
        x1, y1, x2, y2 = faces[0].box
        # the face fills the photo: its box spans most of it
        assert x2 - x1 > 0.45 * photo.width and y2 - y1 > 0.6 * photo.height, (photo.size, faces[0].box)
    for percent in (50, 100):
        coarse = build_detector(search_spec(detector.spec, percent))
        assert coarse.spec.min_face > 154  # larger than the 154 px photo (at 100, than the wide photo's height too)
        for size in ((154, 154), (720, 540), (540, 720)):
            faces = coarse.detect([_face_filling(size)])[0]
            assert len(faces) == 1 and faces[0].score > 0.99, (percent, size, faces)
    # a training folder with a thumbnail in it: every face is found, none is lost to the thumbnail
    for i, photo in enumerate(photos):
        (tmp_path / "train" / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        photo.save(tmp_path / "train" / f"p{i % 2}" / f"{i}.jpg")
    folder = scan_folder(tmp_path / "train")
    assert all(len(f or []) == 1 for f in find_faces(list(folder.paths), detector.spec, folder=tmp_path / "cache"))


def test_a_folder_of_heic_photos_is_scanned_and_its_faces_found_upright(tmp_path, detector):
    """iPhone photos (HEIC), one stored sideways with its rotation in the file: a training folder
    lists them, the face cache finds their faces in the upright photos' pixels, where the server's
    reading (Photo) finds them too."""
    fixtures = Path(__file__).resolve().parent / "fixtures"
    for person, name in (("a", "scene.heic"), ("a", "scene-rotated.HEIC"), ("b", "two-pictures.heic")):
        (tmp_path / "train" / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(fixtures / name.lower(), tmp_path / "train" / person / name)
    shutil.copy(fixtures / "scene.heic", tmp_path / "train" / "b" / "again.heic")
    folder = scan_folder(tmp_path / "train")
    assert len(folder) == 4 and folder.num_identities == 2
    found = find_faces(list(folder.paths), detector.spec, folder=tmp_path / "cache")
    assert all(f for f in found), found  # the largest face first (a part of the clutter may be a second)
    upright = found[list(folder.paths).index(tmp_path / "train" / "a" / "scene.heic")][0]
    for faces in found:
        assert np.abs(np.subtract(faces[0].landmarks, upright.landmarks)).max() < 3
    served = Photo.open(tmp_path / "train" / "a" / "scene-rotated.HEIC", detector.spec.max_side).faces(detector)
    assert np.abs(np.subtract(served[0].landmarks, upright.landmarks)).max() < 3


def _open_cache_at_once(folder: str, start: Any, out: Any) -> None:
    """One process of the test below: open the cache as the others do, write to it, read back."""
    try:
        start.wait()
        cache = FaceCache(DetectorSpec(), Path(folder))
        cache.put_many([(Path(__file__), [])])
        out.put(repr(cache.get_many([Path(__file__)])))
        cache.close()
    except Exception as e:  # reported to the test
        out.put(repr(e))


def test_processes_opening_a_new_face_cache_together_all_get_it(tmp_path):
    """The processes of a multi-process run open the same new cache file at the same moment. SQLite
    answers one of them "database is locked" at once while another switches the file to WAL (no
    busy timeout applies): it must wait its turn, not fail the run."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for i in range(20):  # about one time in three, one of two fails without the wait
        start, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open_cache_at_once, args=(str(tmp_path / str(i)), start, out)) for _ in range(2)]
        for p in procs:
            p.start()
        answers = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert answers == ["[[]]"] * 2, (i, answers)


def test_the_face_cache_gives_a_large_photos_faces_in_its_full_size_pixels(tmp_path, detector):
    """A JPEG whose shorter side is at least twice max_side is decoded at half scale or less for
    detection; its faces come back where they are in the photo itself, on a CPU and on the GPU
    path (workers that only decode, detection where the faces are collected)."""
    import faceid.facecache as facecache

    scene, placed = make_scene([Image.open(f) for f in _faces(1)], np.random.default_rng(5), size=(720, 540))
    photo = tmp_path / "phone.jpg"
    scene.resize((2160, 1620), Image.Resampling.BICUBIC).save(photo, quality=92)  # decoded at 1/2
    spec = detector.spec
    fresh = detector.detect([Image.open(photo).convert("RGB")])[0][0]  # the full-size photo
    width = fresh.box[2] - fresh.box[0]
    cached = find_faces([photo], spec, folder=tmp_path / "cache")[0][0]
    ((_, gpu_faces, _),) = list(facecache._items([facecache._DetectFiles([photo], spec, detect=False)[0]], detector))
    for face in (cached, gpu_faces[0]):
        assert np.abs(np.subtract(face.landmarks, fresh.landmarks)).max() < 0.03 * width
        assert np.abs(np.subtract(face.box, fresh.box)).max() < 0.05 * width
    # where the face was pasted (the scene was enlarged three times)
    (cx, cy), half = (v * 3 for v in placed[0].center), 1.5 * placed[0].side
    x1, y1, x2, y2 = cached.box
    assert abs((x1 + x2) / 2 - cx) < half and abs((y1 + y2) / 2 - cy) < half


def test_training_data_without_a_face_is_left_out_listed_and_refused_when_too_little_is_left(
    tmp_path_factory, tmp_path
):
    train, _ = small_sample(tmp_path_factory)
    data = tmp_path / "train"
    shutil.copytree(train, data)
    first = sorted(d for d in data.iterdir())[0]
    noise = write_image(first / "zz_noise.png", seed=5, size=(90, 90))
    folder = scan_folder(data, what="--train")
    kept, store = load_images(folder, 32, workers=0, what="--train", align="arcface")
    assert kept.no_face == [noise]
    assert len(kept) == len(folder) - 1 and noise not in kept.paths
    # the pairs protocol keeps such an image, unaligned
    kept, store = load_images(folder, 32, workers=0, what="--pairs_file images", align="arcface", no_face="center")
    assert kept.no_face == [noise] and len(kept) == len(folder)
    # a folder where no image shows a face: refused, naming the folder and the fix
    junk = tmp_path / "junk"
    for person in ("a", "b"):
        for i in range(2):
            write_image(junk / person / f"{i}.png", seed=10 * i + ord(person), size=(64, 64))
    with pytest.raises(DataError, match=r"no face was found in any of its 4 images.*--align none"):
        load_images(scan_folder(junk, what="--train"), 32, workers=0, what="--train", align="arcface")
    # one person left with faces: too few identities, and the message says why
    mixed = tmp_path / "mixed"
    shutil.copytree(first, mixed / first.name)
    for i in range(2):
        write_image(mixed / "nobody" / f"{i}.png", seed=40 + i, size=(64, 64))
    with pytest.raises(DataError, match=r"1 identity folder\(s\) with usable images.*no face found were left out"):
        load_images(scan_folder(mixed, what="--train"), 32, workers=0, what="--train", align="arcface")


def test_an_aligned_run_records_how_its_faces_were_prepared_and_the_verifier_prepares_alike(tmp_path_factory):
    from faceid.checkpoint import load_checkpoint
    from faceid.data import decode_image
    from faceid.inference import Verifier

    run = tiny_aligned_run(tmp_path_factory)
    ck = load_checkpoint(run.best)
    assert ck["faces"] == {
        "align": "arcface",
        "img_size": 32,
        "crop": 1.0,
        "template": "arcface-112",
        "detector": DetectorSpec().to_json(),
        "reduced_decode": True,
    }
    assert ck["config"]["align"] == "arcface"
    assert not (run.ckpt_dir / "no_face.txt").exists()
    assert any(e["event"] == "faces" for e in run.events)
    v = Verifier(ck, str(run.best), device="cpu")
    assert v.aligned and v.info["faces"]["align"] == "arcface"
    photo = _faces(1)[0]
    prepared = v.prepare_face(v.read(photo))
    # the training's decoding of the same file, with the cached face, gives the same input
    face = find_faces([photo])[0][0]
    assert torch.equal(prepared.tensor, torch.from_numpy(decode_image(photo, 32, 1.0, face, 480)))
    assert prepared.faces_found == 1 and prepared.face_json()["score"] > 0.9
    # a phone-size JPEG: decoded at a quarter for detection, its face aligned from a reduced
    # decoding; the server's way (pending, then the worker) and the command line's give the same
    # input as training, and the face where it is in the photo
    scene, _ = make_scene([Image.open(photo)], np.random.default_rng(3), size=(720, 540))
    big = tmp_path_factory.mktemp("phone") / "phone.jpg"
    scene.resize((2880, 2160), Image.Resampling.BICUBIC).save(big, quality=92)
    face = find_faces([big])[0][0]
    trained = torch.from_numpy(decode_image(big, 32, 1.0, face, 480))
    served = v.pending(v.open_photo(big.read_bytes()))
    assert served.photo.scale == 4 and v.prepare_pending([served]) == [None]
    cli = v.prepare_face(v.read(big))
    for got in (served.prepared, cli):
        assert torch.equal(got.tensor, trained)
        assert got.face is not None and np.allclose(got.face.landmarks, face.landmarks, atol=1e-3)
    # against the full-size photo: the same face, within a grey level
    full = torch.from_numpy(decode_image(big, 32, 1.0, face)).float()
    assert (full - trained.float()).abs().mean() < 1
    # a larger crop of the face needs a finer decoding than detection's: decoded again, as in training
    opened = Photo.open(big.read_bytes(), 480)
    assert 1 < align_scale(face.landmarks, 112) < opened.scale
    assert np.array_equal(aligned_crop(opened, face, 112), decode_image(big, 112, 1.0, face, 480))
    # an image without a face: named error; detect=False takes it as an aligned crop
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    with pytest.raises(NoFaceError, match="no face found in the 80x80 image.*detect=false"):
        v.prepare_face(noise)
    assert v.prepare_face(noise, detect=False).face is None


def test_pending_photos_are_detected_together_and_only_the_faceless_one_fails(tmp_path_factory):
    """A server's worker finds the faces of a batch's photos in one call (Verifier.prepare_pending):
    each gets what prepare_face gives it alone; a photo without a face gets its own NoFaceError,
    naming its field, and embed raises it."""
    from faceid.inference import Verifier

    v = Verifier.from_checkpoint(tiny_aligned_run(tmp_path_factory).best, device="cpu")
    rng = np.random.default_rng(4)
    a, b = (Image.open(f).convert("RGB") for f in _faces(2))
    scene, _ = make_scene([b], rng, size=(1200, 900))  # shrunk for detection on the decoding side
    empty, _ = make_scene([], rng)
    items = [v.pending(a, "image1"), v.pending(empty, "image2"), v.pending(scene, "images[2]")]
    # reduced by a whole factor that keeps it at max_side or more (shrink_for_detection)
    assert items[2].small.size == (600, 450) and items[2].factor == pytest.approx(2) and items[0].factor == 1.0
    errors = v.prepare_pending(items)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], NoFaceError) and errors[1].field == "image2" and items[1].prepared is None
    for item, photo in ((items[0], a), (items[2], scene)):
        alone = v.prepare_face(photo)
        assert item.face_json() == alone.face_json()
        assert torch.equal(item.tensor, alone.tensor)
    np.testing.assert_allclose(v.embed([items[0], items[2]]), v.embed([a, scene]), atol=1e-5)
    with pytest.raises(NoFaceError, match="no face found"):
        v.embed([v.pending(empty, "image")])
    # a photo whose finer decoding fails (its bytes gone bad between the two reads) fails alone
    big = scene.resize((2400, 1800), Image.Resampling.BICUBIC)
    buf = __import__("io").BytesIO()
    big.save(buf, "JPEG", quality=90)
    bad = Photo.open(buf.getvalue(), DetectorSpec().max_side)
    bad.source = b"not a jpeg any more"
    items = [v.pending(a, "image1"), v.pending(bad, "image2")]
    with pytest.MonkeyPatch.context() as mp:  # as if its face needed a finer decoding than detection's
        mp.setattr("faceid.faces.align_scale", lambda *args, **kw: 1)
        errors = v.prepare_pending(items)
    assert errors[0] is None and items[0].prepared is not None
    assert isinstance(errors[1], ImageError) and errors[1].field == "image2" and items[1].prepared is None
    # a finer search (min_face) beside the model's own in one batch: each photo is detected by its
    # own detector, the small face found only by the finer one, as a lone request finds it
    from faceid.scenes import background

    wide = background((2400, 1200), rng)
    wide.paste(b.convert("RGB").resize((110, 110)), (1500, 600))
    finer = v.detector_for(2)
    assert finer is not v.detector and finer.spec.max_side == 2000 and v.detector_for(None) is v.detector
    items = [v.pending(a, "image1"), v.pending(wide, "image2", finer), v.pending(wide, "image3")]
    errors = v.prepare_pending(items)
    assert errors[0] is None and errors[1] is None and isinstance(errors[2], NoFaceError)
    assert "down to" not in str(errors[2]) and "min_face" in str(errors[2])
    assert items[1].face_json() == v.prepare_face(wide, True, finer).face_json()
    with pytest.raises(NoFaceError, match="down to 2.0% of its longer side"):
        v.prepare_face(background((2400, 1200), rng), True, finer)


def test_checkpoints_without_a_faces_record_are_served_unaligned(tmp_path_factory):
    from faceid.checkpoint import load_checkpoint
    from faceid.inference import Verifier

    run = tiny_aligned_run(tmp_path_factory)
    ck = load_checkpoint(run.best)
    del ck["faces"]
    assert Preparation.from_checkpoint(ck).align == "none"
    v = Verifier(ck, "old.pt", device="cpu")
    assert not v.aligned and v.decode_side is not None
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    assert v.prepare_face(noise).face is None  # no detection, no error
    ck["faces"] = {"align": "arcface", "template": "dlib-68"}
    with pytest.raises(Exception, match="template"):
        Verifier(ck, "odd.pt", device="cpu")


def test_a_faces_record_without_reduced_decode_aligns_from_the_full_size_photo(tmp_path_factory):
    """Aligned checkpoints recorded before `reduced_decode` trained on full-size decodings: they
    are served from the full-size photo, as they always were."""
    from faceid.checkpoint import load_checkpoint
    from faceid.data import decode_image
    from faceid.inference import Verifier

    run = tiny_aligned_run(tmp_path_factory)
    ck = load_checkpoint(run.best)
    del ck["faces"]["reduced_decode"]
    v = Verifier(ck, "older.pt", device="cpu")
    assert v.aligned and not v.preparation.reduced_decode and "reduced_decode" in v.info["faces"]
    scene, _ = make_scene([Image.open(_faces(1)[0])], np.random.default_rng(4), size=(720, 540))
    big = tmp_path_factory.mktemp("older") / "phone.jpg"
    scene.resize((2160, 1620), Image.Resampling.BICUBIC).save(big, quality=92)
    photo = v.open_photo(big)
    assert photo.scale == 1 and photo.image.size == (2160, 1620)
    prepared = v.prepare_face(photo)
    assert prepared.face is not None
    assert torch.equal(prepared.tensor, torch.from_numpy(decode_image(big, 32, 1.0, prepared.face)))


def test_the_cli_finds_a_small_face_with_min_face(tmp_path_factory, capsys):
    """faceid verify and embed: a face about 2.5% of a wide photo's longer side is not found by
    the model's own detection (one line naming --min_face), and is with --min_face 2, where it is;
    a --min_face under the detector's reach is one line too."""
    from faceid.cli import main
    from faceid.scenes import background

    run = tiny_aligned_run(tmp_path_factory)
    folder = tmp_path_factory.mktemp("small_face")
    person = Image.open(_faces(1)[0]).convert("RGB")
    wide = background((2400, 1200), np.random.default_rng(4))
    wide.paste(person.resize((110, 110)), (1500, 600))
    wide.save(folder / "wide.jpg", quality=92)
    person.save(folder / "crop.jpg", quality=92)
    flags = ["--checkpoint", str(run.best), "--device", "cpu"]
    assert main(["verify", str(folder / "wide.jpg"), str(folder / "crop.jpg"), *flags]) == 2
    err = capsys.readouterr().err
    assert "wide.jpg" in err and "no face found" in err and "with --min_face" in err
    assert main(["embed", str(folder / "wide.jpg"), *flags, "--min_face", "2"]) == 0
    x1, y1, x2, y2 = json.loads(capsys.readouterr().out)["face"]["box"]
    assert 1500 < (x1 + x2) / 2 < 1610 and 600 < (y1 + y2) / 2 < 710
    assert main(["verify", str(folder / "wide.jpg"), str(folder / "crop.jpg"), *flags, "--min_face", "1"]) == 2
    assert "--min_face 1: give a percent from 2 to 100" in capsys.readouterr().err


def test_resume_refuses_another_alignment(tmp_path_factory, tmp_path):
    from faceid.config import TrainConfig
    from faceid.errors import ConfigError
    from faceid.train import Trainer

    run = tiny_aligned_run(tmp_path_factory)
    train, val = small_sample(tmp_path_factory)
    cfg = TrainConfig(
        train=str(train),
        val=str(val),
        ckpt_dir=str(tmp_path / "r"),
        train_mode="arcface",
        epochs=2,
        resume=str(run.last),
        **{**TINY, "align": "none"},
    )
    with pytest.raises(ConfigError, match="align='arcface'"):
        Trainer(cfg).setup()
