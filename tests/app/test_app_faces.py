"""The served model finds and aligns faces: /embed, /embed/batch and /verify with a model trained
on aligned faces (a real checkpoint), on whole-scene photos, photos without a face and with two."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import running

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core_fixtures import SAMPLE_VAL, tiny_aligned_run

from faceid.scenes import make_scene

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def aligned_checkpoint(tmp_path_factory) -> Path:
    return tiny_aligned_run(tmp_path_factory).best


@pytest.fixture
def app(make_settings, aligned_checkpoint):
    from app.main import create_app

    return create_app(make_settings(checkpoint=aligned_checkpoint, device="cpu"))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _people() -> list[Path]:
    return [sorted(d.glob("*.jpg"))[0] for d in sorted(SAMPLE_VAL.iterdir()) if d.is_dir()]


async def test_verify_answers_with_the_faces_it_compared_in_whole_scene_photos(app):
    rng = np.random.default_rng(5)
    a, b = (Image.open(p) for p in _people()[:2])
    scene_a, (placed,) = make_scene([a], rng)
    async with running(app) as client:
        model = (await client.get("/model")).json()
        assert model["faces"]["align"] == "arcface" and model["faces"]["template"] == "arcface-112"
        r = await client.post("/verify", files={"image1": ("a.jpg", _jpeg(scene_a)), "image2": ("b.jpg", _jpeg(b))})
        assert r.status_code == 200, r.text
        out = r.json()
        f1, f2 = out["face1"], out["face2"]
        assert f1["faces_found"] == 1 and f2["faces_found"] == 1 and f1["score"] > 0.9
        x1, y1, x2, y2 = f1["box"]
        assert abs((x1 + x2) / 2 - placed.center[0]) < 0.2 * placed.side
        assert abs((y1 + y2) / 2 - placed.center[1]) < 0.2 * placed.side
        assert len(f1["landmarks"]) == 5 and all(len(p) == 2 for p in f1["landmarks"])
        # the face of a crop lies inside it
        assert 0 <= f2["box"][0] < f2["box"][2] <= b.size[0] + 5


async def test_a_phone_size_photo_is_answered_in_its_own_pixels_and_verified_like_its_smaller_copy(app):
    """A 2880x2160 JPEG is decoded at a quarter of its size for detection: the face comes back where
    it is in the uploaded photo, and its embedding is that of the same scene at 720x540."""
    rng = np.random.default_rng(21)
    scene, (placed,) = make_scene([Image.open(_people()[2])], rng, size=(720, 540))
    phone = scene.resize((2880, 2160), Image.Resampling.BICUBIC)
    async with running(app) as client:
        r = await client.post("/verify", files={"image1": ("big.jpg", _jpeg(phone)), "image2": ("s.jpg", _jpeg(scene))})
        assert r.status_code == 200, r.text
        out = r.json()
    big, small = out["face1"], out["face2"]
    x1, y1, x2, y2 = big["box"]
    assert abs((x1 + x2) / 2 - 4 * placed.center[0]) < 0.8 * placed.side
    assert abs((y1 + y2) / 2 - 4 * placed.center[1]) < 0.8 * placed.side
    assert np.allclose(np.array(big["landmarks"]) / 4, small["landmarks"], atol=0.03 * (x2 - x1) / 4)
    assert out["similarity"] > 0.95 and out["match"]


async def test_an_iphone_heic_is_verified_like_the_same_photo_as_a_jpeg(app):
    """A HEIC stored sideways (its rotation in the file) is read upright: its face is where the
    upright JPEG's is, and the two are the same person."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    heic = (fixtures / "scene-rotated.heic").read_bytes()
    jpeg = _jpeg(Image.open(fixtures / "scene.heic"))
    async with running(app) as client:
        r = await client.post("/verify", files={"image1": ("IMG_0001.HEIC", heic), "image2": ("s.jpg", jpeg)})
        assert r.status_code == 200, r.text
        out = r.json()
        r = await client.post("/embed", files={"image": ("IMG_0001.HEIC", heic[: len(heic) // 2])})
        assert r.status_code == 422 and r.json()["field"] == "image", r.text  # a cut file
        assert (await client.get("/health")).status_code == 200
    assert np.allclose(out["face1"]["landmarks"], out["face2"]["landmarks"], atol=3)
    assert out["similarity"] > 0.95 and out["match"]


async def test_a_small_face_in_a_wide_photo_is_found_when_min_face_asks_for_it(app):
    """A face about 2.5% of a 2400x1200 photo's longer side, far under the model's own 8%: /verify
    answers 422 by default, and with min_face 2 finds it where it is and matches its own crop;
    /embed/batch batches it with a photo the model's own detection serves. A min_face under the
    detector's reach is a 422 naming the field."""
    from faceid.scenes import background

    person = Image.open(_people()[3]).convert("RGB")
    wide = background((2400, 1200), np.random.default_rng(4))
    wide.paste(person.resize((110, 110)), (1500, 600))
    files = {"image1": ("wide.jpg", _jpeg(wide)), "image2": ("crop.jpg", _jpeg(person))}
    async with running(app) as client:
        r = await client.post("/verify", files=files)
        assert r.status_code == 422 and r.json()["field"] == "image1" and "no face" in r.json()["detail"]
        r = await client.post("/verify", files=files, data={"min_face": "2"})
        assert r.status_code == 200, r.text
        out = r.json()
        x1, y1, x2, y2 = out["face1"]["box"]
        assert 1500 < (x1 + x2) / 2 < 1610 and 600 < (y1 + y2) / 2 < 710 and out["similarity"] > 0.8
        r = await client.post(
            "/embed/batch",
            files=[("images", ("wide.jpg", _jpeg(wide))), ("images", ("crop.jpg", _jpeg(person)))],
            data={"min_face": "2"},
        )
        assert r.status_code == 200 and [f["faces_found"] >= 1 for f in r.json()["faces"]] == [True, True]
        r = await client.post("/embed", files={"image": ("wide.jpg", _jpeg(wide))}, data={"min_face": "1"})
        assert r.status_code == 422 and r.json()["field"] == "min_face"


async def test_a_larger_min_face_starts_the_search_at_larger_faces(app):
    """A photo with a large face (a box about 38% of its longer side) and a small one (about 9%):
    the model's own search finds both and embeds the larger; min_face 40 (a search from faces of
    37.5%) finds only the larger, where it is, with nearly the same landmarks and embedding. A photo
    with only the smaller face is then a 422 that names the share searched from."""
    from faceid.scenes import background

    big, small = (Image.open(p).convert("RGB") for p in _people()[:2])
    photo = background((800, 600), np.random.default_rng(6))
    photo.paste(big.resize((500, 500)), (280, 40))
    photo.paste(small.resize((120, 120)), (40, 440))
    only_small = background((800, 600), np.random.default_rng(7))
    only_small.paste(small.resize((120, 120)), (40, 440))
    async with running(app) as client:
        own = await client.post("/embed", files={"image": ("p.jpg", _jpeg(photo))})
        coarse = await client.post("/embed", files={"image": ("p.jpg", _jpeg(photo))}, data={"min_face": "40"})
        assert own.status_code == 200 and coarse.status_code == 200, (own.text, coarse.text)
        assert own.json()["face"]["faces_found"] == 2 and coarse.json()["face"]["faces_found"] == 1
        x1, y1, x2, y2 = coarse.json()["face"]["box"]
        assert 280 < (x1 + x2) / 2 < 780 and 40 < (y1 + y2) / 2 < 540
        assert np.allclose(coarse.json()["face"]["landmarks"], own.json()["face"]["landmarks"], atol=8)
        assert np.dot(own.json()["embedding"], coarse.json()["embedding"]) > 0.95
        r = await client.post("/embed", files={"image": ("s.jpg", _jpeg(only_small))}, data={"min_face": "40"})
        assert r.status_code == 422 and r.json()["field"] == "image" and "down to 37.5%" in r.json()["detail"]
        assert (await client.post("/embed", files={"image": ("s.jpg", _jpeg(only_small))})).status_code == 200


async def test_a_thumbnail_and_a_search_for_faces_larger_than_the_photo_find_the_face_it_holds(app):
    """A 30 px thumbnail (below the smallest face searched for) and min_face 100 on a landscape
    selfie (no face can span its longer side) are searched for the largest face the photo can
    hold: an answer with that face, in one request or in a batch beside an ordinary photo."""
    face = Image.open(_people()[0]).convert("RGB")
    thumb = _jpeg(face.resize((30, 30)))
    selfie = Image.new("RGB", (720, 540), (90, 100, 110))
    selfie.paste(face.resize((540, 540)), (90, 0))
    async with running(app) as client:
        r = await client.post("/embed", files={"image": ("t.jpg", thumb)})
        assert r.status_code == 200 and r.json()["face"]["faces_found"] == 1, r.text
        x1, y1, x2, y2 = r.json()["face"]["box"]
        assert x2 - x1 > 12 and y2 - y1 > 15
        r = await client.post(
            "/verify",
            files={"image1": ("s.jpg", _jpeg(selfie)), "image2": ("f.jpg", _jpeg(face))},
            data={"min_face": "100"},
        )
        assert r.status_code == 200, r.text
        x1, _, x2, _ = r.json()["face1"]["box"]
        assert 90 < (x1 + x2) / 2 < 630 and x2 - x1 > 250
        r = await client.post("/embed/batch", files=[("images", ("t.jpg", thumb)), ("images", ("f.jpg", _jpeg(face)))])
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 2, r.text


async def test_no_face_is_a_422_naming_the_image_and_the_server_keeps_serving(app):
    rng = np.random.default_rng(9)
    empty, _ = make_scene([], rng)
    face = _jpeg(Image.open(_people()[0]))
    async with running(app) as client:
        r = await client.post("/verify", files={"image1": ("a.jpg", face), "image2": ("empty.jpg", _jpeg(empty))})
        assert r.status_code == 422
        body = r.json()
        assert body["field"] == "image2" and "no face found" in body["detail"] and "detect=false" in body["detail"]
        r = await client.post("/embed", files={"image": ("empty.jpg", _jpeg(empty))})
        assert r.status_code == 422 and r.json()["field"] == "image"
        r = await client.post("/embed/batch", files=[("images", ("a.jpg", face)), ("images", ("e.jpg", _jpeg(empty)))])
        assert r.status_code == 422 and r.json()["field"] == "images[1]"
        # detect=false: the upload is taken as an aligned crop, and no face is reported
        r = await client.post("/embed", files={"image": ("empty.jpg", _jpeg(empty))}, data={"detect": "false"})
        assert r.status_code == 200 and r.json()["face"] is None
        r = await client.post("/embed", files={"image": ("a.jpg", face)}, data={"detect": "maybe"})
        assert r.status_code == 422 and r.json()["field"] == "detect"
        assert (await client.get("/health")).status_code == 200


async def test_requests_detected_in_one_batch_answer_alone_and_a_faceless_one_fails_only_itself(app):
    """Concurrent requests share the worker's batches, where their faces are found in one detector
    call: each answer equals the one the request gets alone, and a photo without a face is a 422
    for its own request only. Server-Timing shows the detection."""
    import asyncio

    rng = np.random.default_rng(13)
    people = [Image.open(p) for p in _people()[:3]]
    scenes = [_jpeg(make_scene([p], rng)[0]) for p in people]
    empty = _jpeg(make_scene([], rng)[0])
    async with running(app) as client:
        alone = []
        for s in scenes:
            r = await client.post("/embed", files={"image": ("s.jpg", s)})
            assert r.status_code == 200, r.text
            assert "detect;dur=" in r.headers["server-timing"]
            alone.append(r.json())
        uploads = scenes + [empty] * 3
        for _ in range(3):  # the batches the worker forms vary; every answer must hold in each
            answers = await asyncio.gather(*(client.post("/embed", files={"image": ("s.jpg", u)}) for u in uploads))
            for r, one in zip(answers, alone):
                assert r.status_code == 200, r.text
                assert r.json()["face"] == one["face"]
                np.testing.assert_allclose(r.json()["embedding"], one["embedding"], atol=1e-4)
            for r in answers[len(scenes) :]:
                assert r.status_code == 422 and r.json()["field"] == "image"
        stats = (await client.get("/model")).json()["batching"]
        assert stats["batches"] < stats["requests"]  # some requests did share a batch


async def test_large_photos_are_detected_on_their_decoding_thread_with_the_same_answers(app, monkeypatch):
    """Photos above BATCHED_DETECTION_MAX_PIXELS are detected and aligned where they are decoded, so
    the worker's queue never holds their pixels; the answers are those of batched detection."""
    import app.model_manager as mm

    rng = np.random.default_rng(17)
    scene = _jpeg(make_scene([Image.open(_people()[1])], rng)[0])
    empty = _jpeg(make_scene([], rng)[0])
    async with running(app) as client:
        batched = await client.post("/verify", files={"image1": ("a.jpg", scene), "image2": ("b.jpg", scene)})
        assert batched.status_code == 200 and "detect;dur=" in batched.headers["server-timing"]
        monkeypatch.setattr(mm, "BATCHED_DETECTION_MAX_PIXELS", 0)
        alone = await client.post("/verify", files={"image1": ("a.jpg", scene), "image2": ("b.jpg", scene)})
        assert alone.status_code == 200 and "detect;dur=" not in alone.headers["server-timing"]
        assert alone.json()["face1"] == batched.json()["face1"]
        assert alone.json()["similarity"] == pytest.approx(batched.json()["similarity"], abs=1e-5)
        r = await client.post("/verify", files={"image1": ("a.jpg", scene), "image2": ("e.jpg", empty)})
        assert r.status_code == 422 and r.json()["field"] == "image2"


async def test_two_faces_the_largest_is_used_and_the_count_is_given(app):
    rng = np.random.default_rng(21)
    a, b = (Image.open(p) for p in _people()[2:4])
    scene, placed = make_scene([a, b], rng, size=(800, 500), side_range=(0.3, 0.45))
    big = max(placed, key=lambda p: p.side)
    async with running(app) as client:
        r = await client.post(
            "/embed/batch", files=[("images", ("two.jpg", _jpeg(scene))), ("images", ("one.jpg", _jpeg(a)))]
        )
        assert r.status_code == 200, r.text
        faces = r.json()["faces"]
        assert faces[0]["faces_found"] == 2 and faces[1]["faces_found"] == 1
        x1, y1, x2, y2 = faces[0]["box"]
        assert abs((x1 + x2) / 2 - big.center[0]) < 0.2 * big.side


async def test_get_model_says_how_many_negative_pairs_back_each_far_threshold(app, aligned_checkpoint):
    """The tiny run evaluated 200 pairs (100 negatives): its FAR 1e-3 threshold lets none through and
    is flagged unresolved; its acc threshold names the 200 pairs it was chosen on."""
    async with running(app) as client:
        model = (await client.get("/model")).json()
    points, metrics = model["operating_points"], model["metrics"]
    assert metrics["n_neg"] == 100
    assert points["far_1e-3"] == {
        "threshold": model["thresholds"]["far_1e-3"],
        "far": 0.001,
        "tar": metrics["tar_1e-3"],
        "negatives": 100,
        "false_accepts": 0,
        "resolved": False,
    }
    assert points["far_1e-2"]["false_accepts"] == 1 and points["far_1e-2"]["resolved"] is False
    assert points["acc"] == {"threshold": model["thresholds"]["acc"], "accuracy": metrics["acc"], "pairs": 200}
