"""POST /embed and POST /verify: answers, thresholds, upload limits, and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib

import anyio
import numpy as np
import pytest
from PIL import Image
from service_helpers import face_like, image_bytes, running, write_fake_checkpoint

pytestmark = pytest.mark.anyio

NAMES = ("acc", "far_1e-2", "far_1e-3")


@pytest.fixture
def served_app(make_app, tmp_path):
    ckpt = write_fake_checkpoint(tmp_path / "given" / "backbone_best.pt")

    def make(**changes):
        return make_app(checkpoint=ckpt, **changes)

    return make


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one tiny IDAT: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _sixteen_bit_png() -> bytes:
    arr = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


async def test_503_before_any_model(make_app):
    async with running(make_app()) as client:
        for path, files in (
            ("/embed", {"image": ("a.jpg", image_bytes())}),
            ("/verify", {"image1": ("a.jpg", image_bytes()), "image2": ("b.jpg", image_bytes())}),
        ):
            r = await client.post(path, files=files)
            assert r.status_code == 503
            detail = r.json()["detail"]
            assert "POST /jobs" in detail and "FACEID_CHECKPOINT" in detail
            assert r.headers.get("retry-after")
        r = await client.get("/ready")
        assert r.status_code == 503 and r.json()["ready"] is False and "POST /jobs" in r.json()["detail"]
        assert r.headers.get("retry-after") == "60"


async def test_embed(served_app):
    async with running(served_app()) as client:
        r = await client.post("/embed", files={"image": ("face.png", face_like(1))})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dim"] == 12 == len(body["embedding"])
        assert abs(np.linalg.norm(body["embedding"]) - 1) < 1e-4
        assert body["model"].startswith("checkpoint-")
        assert (await client.get("/ready")).json() == {"ready": True, "model": body["model"], "detail": None}


def _server_timing(header: str) -> dict[str, tuple[float, str]]:
    out = {}
    for part in header.split(", "):
        name, *params = part.split(";")
        kv = dict(p.split("=", 1) for p in params)
        out[name] = (float(kv["dur"]), kv.get("desc", "").strip('"'))
    return out


async def test_server_timing_says_where_the_time_went(served_app):
    """Each /embed and /verify answer carries a Server-Timing header: reading the upload, decoding,
    queueing for the worker, the forward pass of its batch, the hand-back, and the total. A
    forward pass made 60 ms slower shows as such in `forward` and `total`."""
    import time as _time

    app = served_app()
    async with running(app) as client:
        verifier = app.state.models.require().verifier
        real = verifier.embed

        def slow(images):
            _time.sleep(0.06)
            return real(images)

        verifier.embed = slow
        r = await client.post("/embed", files={"image": ("face.png", face_like(1))})
        assert r.status_code == 200, r.text
        t = _server_timing(r.headers["server-timing"])
        assert list(t) == ["read", "decode", "queue", "forward", "handback", "total"]
        assert all(d >= 0 for d, _ in t.values())
        assert t["forward"][0] >= 60 and t["forward"][1] == "batch of 1"
        assert t["total"][0] >= sum(t[k][0] for k in ("read", "decode", "queue", "forward")) - 0.1
        assert t["total"][0] < 60 + 5000
        r = await client.post("/verify", files={"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(2))})
        assert r.status_code == 200, r.text
        t = _server_timing(r.headers["server-timing"])
        assert t["forward"][0] >= 60 and t["forward"][1] == "batch of 2" and t["total"][0] >= 60
        verifier.embed = real
        r = await client.post("/embed", files={"image": ("face.png", face_like(1))})
        assert _server_timing(r.headers["server-timing"])["forward"][0] < 60


async def test_verify_and_thresholds(served_app):
    async with running(served_app()) as client:
        same = {"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(1))}
        r = await client.post("/verify", files=same)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert body["threshold"] == 0.5 and body["threshold_name"] == "acc" and body["match"] is True
        assert body["model"].startswith("checkpoint-")
        other = {
            "image1": ("a.png", image_bytes(color=(250, 250, 250))),
            "image2": ("b.png", image_bytes(color=(5, 5, 5))),
        }
        body = (await client.post("/verify", files=other)).json()
        assert body["similarity"] < 0 and body["match"] is False
        for name, value in zip(NAMES, (0.5, 0.8, 0.9)):
            body = (await client.post("/verify", files=same, data={"threshold": name})).json()
            assert (body["threshold"], body["threshold_name"]) == (value, name)
        for raw, value in (("0.25", 0.25), ("-1", -1.0), ("1", 1.0), (" 0.3 ", 0.3), ("", 0.5)):
            body = (await client.post("/verify", files=same, data={"threshold": raw})).json()
            assert body["threshold"] == value
            assert body["match"] == (body["similarity"] >= body["threshold"])
        for raw in ("1.5", "-1.01", "nan", "inf", "abc", "pairs_acc", "ACC", "0x1"):
            r = await client.post("/verify", files=same, data={"threshold": raw})
            assert r.status_code == 422, (raw, r.text)
            assert r.json()["detail"].startswith("threshold:") and r.json()["field"] == "threshold"


BAD_IMAGES = [
    ("empty", b"", "empty"),
    ("random bytes", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
    ("truncated jpeg", image_bytes("JPEG", (256, 256))[:300], ""),
    ("truncated png", face_like(3, 128)[:500], ""),
    ("html", b"<!doctype html><html><body>hello</body></html>", "not an image"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "not an image"),
    ("animated gif", _animated_gif(), "GIF"),
    ("one pixel", image_bytes("PNG", (1, 1)), "too small"),
    ("tiff", image_bytes("TIFF", (32, 32)), "TIFF"),
]


@pytest.mark.parametrize("name,data,needle", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
async def test_bad_images_are_4xx_and_server_keeps_serving(served_app, name, data, needle):
    async with running(served_app()) as client:
        r = await client.post("/embed", files={"image": ("photo.jpg", data)})
        assert 400 <= r.status_code < 500 and r.status_code == 422, (name, r.status_code, r.text)
        assert needle in r.json()["detail"]
        r = await client.post("/verify", files={"image1": ("a.jpg", face_like(1)), "image2": ("b.jpg", data)})
        assert r.status_code == 422 and "image2" in r.json()["detail"]
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/embed", files={"image": ("ok.png", face_like(1))})).status_code == 200


async def test_decompression_bomb_is_413_before_decoding(served_app):
    async with running(served_app()) as client:
        bomb = _png_header_only(100_000, 100_000)
        assert len(bomb) < 200
        r = await client.post("/embed", files={"image": ("bomb.png", bomb)})
        assert r.status_code == 413 and "too large" in r.json()["detail"]
    async with running(served_app(max_pixels=10_000)) as client:
        r = await client.post("/embed", files={"image": ("big.png", image_bytes("PNG", (200, 200)))})
        assert r.status_code == 413 and "10,000" in r.json()["detail"]


@pytest.mark.parametrize(
    "data,mode",
    [
        (image_bytes("JPEG", mode="CMYK", color=(0, 200, 200, 0)), "cmyk jpeg"),
        (_sixteen_bit_png(), "16-bit png"),
        (image_bytes("PNG", mode="L", color=128), "greyscale"),
        (image_bytes("PNG", mode="RGBA", color=(10, 20, 30, 0)), "alpha"),
        (image_bytes("PNG", mode="P", color=3), "palette"),
        (image_bytes("WEBP"), "webp"),
        (image_bytes("BMP"), "bmp"),
        (_exif_rotated(), "exif rotated"),
    ],
)
async def test_accepted_image_kinds(served_app, data, mode):
    async with running(served_app()) as client:
        r = await client.post("/embed", files={"image": ("x", data)})
        assert r.status_code == 200, (mode, r.text)


async def test_upload_limit_is_413(served_app):
    async with running(served_app(max_upload_mb=0.01)) as client:  # 10 KB
        big = face_like(2, 128)
        assert len(big) > 20_000
        r = await client.post("/embed", files={"image": ("big.png", big)})
        assert r.status_code == 413 and "FACEID_MAX_UPLOAD_MB" in r.json()["detail"]
        r = await client.post("/verify", files={"image1": ("a.png", face_like(1, 32)), "image2": ("b.png", big)})
        assert r.status_code == 413
        small = image_bytes("JPEG", (32, 32))
        assert (await client.post("/embed", files={"image": ("s.jpg", small)})).status_code == 200


async def test_upload_limit_applies_while_streaming(served_app):
    """No Content-Length: reading stops at the limit, it does not take the whole body first."""
    sent = 0

    async def body():
        nonlocal sent
        yield b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(1000):  # 64 MB offered
            sent += 65536
            yield b"\0" * 65536

    async with running(served_app(max_upload_mb=1)) as client:
        r = await client.post("/embed", content=body(), headers={"content-type": "multipart/form-data; boundary=XyZ"})
        assert r.status_code == 413
        assert sent < 4 * 1024 * 1024


async def test_declared_content_length_over_limit_is_413(served_app):
    async with running(served_app(max_upload_mb=1)) as client:
        r = await client.post(
            "/embed",
            content=b"x" * 10,
            headers={"content-type": "multipart/form-data; boundary=XyZ", "content-length": str(50 * 1024 * 1024)},
        )
        assert r.status_code == 413


@pytest.mark.parametrize(
    "kwargs,status,needle",
    [
        ({"files": {"picture": ("a.png", face_like(1))}}, 422, "picture"),
        ({"data": {"threshold": "acc"}}, 415, "multipart"),
        ({"json": {"image": "aGVsbG8="}}, 415, "multipart/form-data"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}}, 415, "image/jpeg"),
        ({"content": b"", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
        (
            {
                "content": b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc',
                "headers": {"content-type": "multipart/form-data; boundary=XyZ"},
            },
            400,
            "cut off",
        ),
        (
            {
                "content": b"garbage without boundaries",
                "headers": {"content-type": "multipart/form-data; boundary=XyZ"},
            },
            400,
            "multipart",
        ),
        ({"files": [("image", ("a.png", face_like(1))), ("image", ("b.png", face_like(2)))]}, 422, "twice"),
        ({"files": {"image": ("a.png", face_like(1))}, "data": {"threshold": "acc"}}, 422, "threshold"),
    ],
)
async def test_malformed_embed_requests(served_app, kwargs, status, needle):
    async with running(served_app()) as client:
        r = await client.post("/embed", **kwargs)
        assert r.status_code == status, r.text
        assert needle in r.json()["detail"]
        assert (await client.post("/embed", files={"image": ("ok.png", face_like(1))})).status_code == 200


async def test_verify_missing_field_and_long_threshold(served_app):
    async with running(served_app()) as client:
        r = await client.post("/verify", files={"image1": ("a.png", face_like(1))})
        assert r.status_code == 422 and "'image2'" in r.json()["detail"]
        r = await client.post(
            "/verify",
            files={"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(1))},
            data={"threshold": "0" * 10_000},
        )
        assert r.status_code == 422 and "too long" in r.json()["detail"]


async def test_concurrent_requests_are_batched(served_app):
    app = served_app(batch_wait_ms=50, batch_max_size=8)
    async with running(app) as client:
        # A real forward pass takes a while, and requests arriving meanwhile queue for the next one
        # (with an instant one, two workers each take their share: one request at a time).
        app.state.models.current.verifier.forward_s = 0.02
        results = {}

        async def one(i: int) -> None:
            r = await client.post("/embed", files={"image": ("a.png", face_like(i))})
            results[i] = r

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        assert all(r.status_code == 200 for r in results.values())
        verifier = app.state.models.current.verifier
        assert max(verifier.calls) > 1 and sum(verifier.calls) == 8
        # each answer is its own image's embedding
        alone = (await client.post("/embed", files={"image": ("a.png", face_like(5))})).json()["embedding"]
        assert np.allclose(alone, results[5].json()["embedding"], atol=1e-6)


async def test_embed_batch_answers_each_image_as_embed_does_in_one_forward_pass(served_app):
    app = served_app(batch_max_size=4)
    async with running(app) as client:
        files = [
            ("images", ("a.png", face_like(1))),
            ("images", ("b.jpg", image_bytes(color=(10, 90, 200)))),
            ("images", ("c.png", face_like(3))),
        ]
        verifier = app.state.models.current.verifier
        verifier.calls.clear()
        r = await client.post("/embed/batch", files=files)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == 3 == len(body["embeddings"]) and body["dim"] == 12
        assert body["model"].startswith("checkpoint-") and "forward" in r.headers["server-timing"]
        assert verifier.calls == [3]  # one forward pass for the three
        for (_, (name, data)), vector in zip(files, body["embeddings"]):
            alone = (await client.post("/embed", files={"image": (name, data)})).json()["embedding"]
            assert np.allclose(alone, vector, atol=1e-6), name
        one = await client.post("/embed/batch", files=[("images", ("a.png", face_like(1)))])
        assert one.status_code == 200 and one.json()["count"] == 1


@pytest.mark.parametrize(
    "files,status,needle",
    [
        ([("images", ("a.png", face_like(i))) for i in range(5)], 422, "more than 4 files in form field 'images'"),
        ([("images", ("a.png", face_like(1))), ("images", ("b.txt", b"not an image at all"))], 422, "images[1]"),
        ([("image", ("a.png", face_like(1)))], 422, "unexpected form field 'image'; this route takes detect, images"),
        ([], 415, "multipart"),
    ],
)
async def test_bad_embed_batch_requests_name_the_fix(served_app, files, status, needle):
    async with running(served_app(batch_max_size=4)) as client:
        r = await client.post("/embed/batch", files=files) if files else await client.post("/embed/batch", data={})
        assert r.status_code == status, r.text
        assert needle in r.json()["detail"]
        assert (await client.post("/embed/batch", files=[("images", ("ok.png", face_like(1)))])).status_code == 200


async def test_embed_batch_body_limit_grows_with_the_batch_size(served_app):
    noise = np.random.default_rng(0).integers(0, 256, (540, 540, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    big = buf.getvalue()  # incompressible: about 0.85 MB, under the 1 MB per image
    assert 0.8e6 < len(big) < 1024 * 1024
    async with running(served_app(max_upload_mb=1, batch_max_size=4)) as client:
        r = await client.post("/embed/batch", files=[("images", (f"{i}.png", big)) for i in range(3)])
        assert r.status_code == 200 and r.json()["count"] == 3  # 2.6 MB: more than /embed's one image
        headers = {"content-type": "multipart/form-data; boundary=XyZ", "content-length": str(int(5.5 * 1024 * 1024))}
        r = await client.post("/embed/batch", content=b"x", headers=headers)  # over 4 images of 1 MB
        assert r.status_code == 413 and "limit" in r.json()["detail"]
