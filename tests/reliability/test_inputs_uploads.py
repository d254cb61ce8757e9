"""Bad and odd uploads to /embed and /verify through the real app (fake model), beyond
tests/app/test_app_inference.py: each is a 4xx naming the problem (never a 5xx), and afterwards
/health and a valid /verify still answer. Accepted odd images are checked for what reaches the
model (orientation, alpha, CMYK, 16-bit), not only for a 200.
"""

from __future__ import annotations

import io
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from reliability_helpers import (
    bmp_bomb,
    encode,
    exif_oriented,
    gif_bomb,
    jpeg_bomb,
    png_bomb,
    png_chunk,
    quadrant_image,
    sixteen_bit_png,
)
from service_helpers import face_like, image_bytes, running

pytestmark = pytest.mark.anyio

GOOD = {"image1": ("a.png", face_like(1)), "image2": ("b.png", face_like(1))}


async def still_serving(client) -> None:
    """The server answers /health and a valid /verify after whatever came before."""
    r = await client.get("/health")
    assert r.status_code == 200, r.text
    r = await client.post("/verify", files=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["similarity"] == pytest.approx(1.0, abs=1e-4) and r.json()["match"] is True


def _ztxt_bomb() -> bytes:
    """A valid 16x16 PNG with a zTXt chunk that inflates to 64 MB (Pillow caps text chunks)."""
    png = encode(Image.new("RGB", (16, 16), (9, 9, 9)), "PNG")
    bomb = png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * (64 << 20), 9))
    return png[:33] + bomb + png[33:]  # after the signature and IHDR


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _progressive_truncated() -> bytes:
    data = encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), np.uint8)),
        "JPEG",
        progressive=True,
        quality=90,
    )
    return data[: len(data) // 2]


def _bad_crc_png() -> bytes:
    data = bytearray(face_like(4, 64))
    data[29] ^= 0xFF  # inside the IHDR CRC
    return bytes(data)


# (id, bytes, accepted statuses, words one of which the detail must contain)
BAD_UPLOADS = [
    ("soi only", b"\xff\xd8", {422}, ("corrupt", "not an image")),
    (
        "jpeg header then html",
        b"\xff\xd8\xff\xe0" + b"<html><script>alert(1)</script></html>",
        {422},
        ("corrupt", "not an image"),
    ),
    ("progressive jpeg cut in half", _progressive_truncated(), {422}, ("truncated", "corrupt")),
    ("png with bad crc", _bad_crc_png(), {422}, ("corrupt", "not an image")),
    ("png ztxt bomb", _ztxt_bomb(), {422, 413}, ("corrupt", "too large")),
    ("gif named jpg", image_bytes("GIF", (32, 32)), {422}, ("GIF",)),
    ("animated webp", _animated("WEBP"), {422}, ("animated",)),
    ("animated png", _animated("PNG"), {422}, ("animated",)),
    ("1 x 4000", image_bytes("PNG", (1, 4000)), {422}, ("too small",)),
    ("7 x 7", image_bytes("PNG", (7, 7)), {422}, ("too small",)),
    ("utf-16 text", "hello \u00e9".encode("utf-16"), {422}, ("not an image",)),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", {422}, ("not an image", "unsupported")),
    ("ico", encode(Image.new("RGB", (32, 32)), "ICO"), {422}, ("ICO", "unsupported", "not an image")),
]


async def test_bad_uploads_in_verify_are_4xx_and_the_server_keeps_serving(served_app):
    """One server takes every case in turn; after each, /health and a valid /verify answer."""
    async with running(served_app()) as client:
        for name, data, statuses, words in BAD_UPLOADS:
            r = await client.post(
                "/verify", files={"image1": ("photo.jpg", data, "image/jpeg"), "image2": ("b.png", face_like(2))}
            )
            assert r.status_code in statuses, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert "image1" in detail and any(w in detail for w in words), (name, detail)
            await still_serving(client)


BOMBS = [
    ("png", png_bomb(100_000, 100_000)),
    ("jpeg", jpeg_bomb(60_000, 60_000)),
    ("bmp", bmp_bomb(50_000, 50_000)),
    ("png just over the limit", png_bomb(8_000, 5_001)),
]


@pytest.mark.parametrize("name,data", BOMBS, ids=[b[0] for b in BOMBS])
async def test_decompression_bomb_is_refused_from_the_header(served_app, monkeypatch, name, data):
    """Refused with 413 and no pixel decoded: ImageFile.load is never called for it."""
    loads: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    assert len(data) < 2000
    async with running(served_app()) as client:
        t0 = time.monotonic()
        r = await client.post("/verify", files={"image1": ("a.png", face_like(1)), "image2": ("bomb", data)})
        assert time.monotonic() - t0 < 5
        assert r.status_code == 413, r.text
        assert "image2" in r.json()["detail"] and "too large" in r.json()["detail"]
        assert all(w * h <= 40_000_000 for w, h in loads), loads  # only the small image was decoded
        await still_serving(client)


async def test_bomb_in_a_refused_format_is_4xx_without_decoding(served_app, monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"decoded {self.size}"))
    async with running(served_app()) as client:
        r = await client.post("/embed", files={"image": ("bomb.gif", gif_bomb(65_000, 65_000))})
        assert r.status_code in (413, 422), r.text
        assert "GIF" in r.json()["detail"] or "too large" in r.json()["detail"] or "not an image" in r.json()["detail"]
    monkeypatch.undo()
    async with running(served_app()) as client:
        await still_serving(client)


async def _embedding(client, data: bytes) -> np.ndarray:
    r = await client.post("/embed", files={"image": ("x", data)})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embedding"])


def _alpha_over_white() -> tuple[bytes, bytes]:
    """An RGBA image (left half transparent red, right half opaque blue) and what it looks like."""
    arr = np.zeros((48, 64, 4), np.uint8)
    arr[:, :32] = (255, 0, 0, 0)
    arr[:, 32:] = (0, 0, 255, 255)
    seen = np.zeros((48, 64, 3), np.uint8)
    seen[:, :32] = 255
    seen[:, 32:] = (0, 0, 255)
    return encode(Image.fromarray(arr, "RGBA")), encode(Image.fromarray(seen))


def _cmyk() -> tuple[bytes, bytes]:
    rgb = quadrant_image()
    return encode(rgb.convert("CMYK"), "JPEG", quality=95), encode(rgb)


def _grey() -> tuple[bytes, bytes]:
    grey = quadrant_image().convert("L")
    return encode(grey), encode(grey.convert("RGB"))


def _sixteen_bit() -> tuple[bytes, bytes]:
    """16-bit 10000 | 50000 is 8-bit 39 | 195 (scaled, not clipped to 255 | 255)."""
    seen = np.zeros((48, 64, 3), np.uint8)
    seen[:, :32] = 39
    seen[:, 32:] = 195
    return sixteen_bit_png(10_000, 50_000), encode(Image.fromarray(seen))


def _exif(orientation: int) -> tuple[bytes, bytes]:
    img = quadrant_image()
    return exif_oriented(img, orientation), encode(
        ImageOps.exif_transpose(Image.open(io.BytesIO(exif_oriented(img, orientation))))
    )


ACCEPTED = [
    ("alpha over white", _alpha_over_white()),
    ("cmyk jpeg", _cmyk()),
    ("greyscale", _grey()),
    ("16-bit greyscale", _sixteen_bit()),
] + [(f"exif orientation {o}", _exif(o)) for o in (3, 6, 8)]


@pytest.mark.parametrize("name,pair", ACCEPTED, ids=[a[0] for a in ACCEPTED])
async def test_odd_images_reach_the_model_as_they_look(served_app, name, pair):
    """The model sees the image as a viewer shows it: the embedding of the odd file equals the
    embedding of a plain RGB PNG of what it looks like (the fake model embeds the 2x2 layout)."""
    odd, looks_like = pair
    async with running(served_app()) as client:
        e_odd, e_ref = await _embedding(client, odd), await _embedding(client, looks_like)
        assert float(e_odd @ e_ref) > 0.99, (name, float(e_odd @ e_ref))
        if name.startswith("exif"):  # not merely the stored pixels
            e_raw = await _embedding(client, encode(quadrant_image()))
            assert float(e_odd @ e_raw) < 0.9
        await still_serving(client)


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"B0undary") -> tuple[bytes, dict]:
    """parts: (part header lines, body)."""
    out = b""
    for headers, body in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + body + b"\r\n"
    out += b"--" + boundary + b"--\r\n"
    return out, {"content-type": "multipart/form-data; boundary=" + boundary.decode()}


def _disp(name: bytes, filename: bytes | None = b"a.png") -> bytes:
    return (
        b'Content-Disposition: form-data; name="'
        + name
        + b'"'
        + (b'; filename="' + filename + b'"' if filename is not None else b"")
    )


IMG = face_like(1)
ODD_FORMS = [
    ("filename of 100 KB", [(_disp(b"image", b"x" * 100_000), IMG)], {200, 400}),
    ("filename with ../ and NUL", [(_disp(b"image", b"../../etc/passwd\x00.png"), IMG)], {200}),
    ("part content type text/html", [(_disp(b"image") + b"\r\nContent-Type: text/html", IMG)], {200}),
    ("non-utf8 field name", [(_disp(b"im\xffage"), IMG)], {422}),
    ("part without a name", [(b'Content-Disposition: form-data; filename="a.png"', IMG)], {400}),
    ("part without Content-Disposition", [(b"Content-Type: image/png", IMG)], {400}),
    ("2000 unknown fields", [(_disp(b"f%d" % i, None), b"1") for i in range(2000)], {422}),
    ("image sent as a text field", [(_disp(b"image", None), IMG)], {200}),
    ("10 KB header value", [(_disp(b"image") + b"\r\nX-Pad: " + b"p" * 10_000, IMG)], {200, 400}),
]


BAD_HEADERS = [
    ({"content-type": "multipart/mixed; boundary=B0undary"}, 415),
    ({"content-type": "multipart/form-data; boundary="}, 400),
    ({"content-type": "multipart/form-data; boundary=" + "b" * 5000}, 400),
    ({"content-type": "multipart/form-data; boundary=B0undary", "content-length": "lots"}, 400),
    ({"content-type": "text/plain"}, 415),
    ({}, 415),
]


async def test_a_refused_upload_field_is_named_in_field_as_job_fields_are(served_app):
    async with running(served_app()) as client:
        for path, files, field, status in [
            ("/verify", {"image1": ("a.png", IMG)}, "image2", 422),
            ("/embed", {"photo": ("a.png", IMG)}, "photo", 422),
            ("/verify", {"image1": ("a.png", IMG), "image2": ("b.png", b"<html>")}, "image2", 422),
            ("/embed/batch", [("images", ("a.png", IMG)), ("images", ("b.png", b"junk"))], "images[1]", 422),
        ]:
            r = await client.post(path, files=files)
            assert (r.status_code, r.json().get("field")) == (status, field), (path, r.text)
        r = await client.post("/embed", content=b"")
        assert r.status_code == 415 and "not a request without a Content-Type" in r.json()["detail"], r.text


async def test_odd_multipart_bodies_and_headers(served_app):
    async with running(served_app()) as client:
        for name, parts, statuses in ODD_FORMS:
            body, headers = _multipart(parts)
            r = await client.post("/embed", content=body, headers=headers)
            assert r.status_code in statuses, (name, r.status_code, r.text)
            assert len(r.content) < 4000, name  # nothing of a huge input is echoed
            await still_serving(client)
        body, _ = _multipart([(_disp(b"image"), IMG)])
        for headers, status in BAD_HEADERS:
            r = await client.post("/embed", content=body, headers=headers)
            assert r.status_code == status, (headers, r.text)
            assert len(r.content) < 2000
            await still_serving(client)
