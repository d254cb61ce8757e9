"""Bad POST /jobs bodies through the real app, beyond tests/app/test_app_jobs.py: every field with
wrong types, NaN / infinity in every float field, absurd values, very long strings, parse bombs,
`..` / absolute / `~` path variants, and symbolic links at every level the trainer reads. Each is
a 4xx whose detail names the field or the problem, echoes nothing large, creates no job, and the
server still answers and accepts a valid job afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from service_helpers import image_bytes, running

from faceid.config import TrainConfig

pytestmark = pytest.mark.anyio

VALID = {"train": "sample/train", "val": "sample/val", "epochs": 1, "img_size": 32}
FLOAT_FIELDS = [n for n, f in TrainConfig.model_fields.items() if f.annotation is float]
INT_FIELDS = [n for n, f in TrainConfig.model_fields.items() if f.annotation is int]


async def post_raw(client, body: str | bytes):
    return await client.post("/jobs", content=body, headers={"content-type": "application/json"})


async def refused(client, body: str | bytes, needle: str, statuses=(422,)) -> dict:
    """POST the raw JSON body; it must be refused with a small answer that names `needle`."""
    r = await post_raw(client, body)
    assert r.status_code in statuses, (str(body)[:200], r.status_code, r.text[:500])
    assert len(r.content) < 4096, (str(body)[:200], len(r.content))
    out = r.json()
    json.dumps(out, allow_nan=False)
    assert needle in out["detail"], (str(body)[:200], out["detail"])
    return out


async def still_serving(client, jobs_before: int = 0) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/jobs")).json()["total"] == jobs_before


def with_fields(**fields) -> str:
    return json.dumps({**VALID, **fields})


def with_raw(name: str, raw: str) -> str:
    """VALID plus `"name": raw` where raw is a JSON token json.dumps would not write (NaN, ...)."""
    return json.dumps(VALID)[:-1] + f", {json.dumps(name)}: {raw}}}"


async def test_nan_and_infinity_in_every_float_field(make_app):
    assert len(FLOAT_FIELDS) >= 10
    async with running(make_app()) as client:
        for name in FLOAT_FIELDS:
            for raw in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", '"nan"', '"inf"', '"-Infinity"'):
                await refused(client, with_raw(name, raw), name)
        for name in INT_FIELDS:
            for raw in ("NaN", "Infinity", "1e400", '"inf"'):
                await refused(client, with_raw(name, raw), name)
        await still_serving(client)


# field -> values the validation must refuse (beyond tests/app's absurd values)
ABSURD = {
    "batch_size": [0, -1, 10**9, 2**63],
    "lr": [0, -0.0, 1e308, 11],
    "arcface_m": [-0.1, 1.5708, 100],
    "arcface_s": [-1, 1e9],
    "scale_logits": [0, 1e12],
    "img_size": [31, 0, 2**31, -224],
    "embedding_size": [0, 1, 10**6],
    "epochs": [2**63, 10**30],
    "workers": [-1, 10**4],
    "threads": [-1, 10**6],
    "eval_pairs": [1, 10**12],
    "pairs_per_epoch": [0, 10**12],
    "seed": [-1, 2**64],
    "warmup_epochs": [-1, 10**9],
    "margin_warmup_epochs": [-1, 10**6],
    "time_limit_min": [-5],
    "progress_step_pct": [0, 101],
    "max_steps_per_epoch": [-1],
    "cache_max_gb": [-1, 10**6],
    "weight_decay": [-1, 2],
    "backbone_lr_scale": [-1, 1000],
    "clip_grad_norm": [-1, 1e12],
    "freeze_backbone_epochs": [-1],
    "nproc_per_node": [0, -1, 10**6],
    "pairs_folds": [[], [0], [-3], [10**30], [1, "x"]],
}


async def test_absurd_values_are_422_naming_the_field(make_app):
    async with running(make_app()) as client:
        for name, values in ABSURD.items():
            for value in values:
                out = await refused(client, with_fields(**{name: value}), name)
                assert out["field"].split(".")[0] == name, out
        await still_serving(client)
        assert (await client.post("/jobs", json=VALID)).status_code == 202


async def test_wrong_types_in_every_field_are_422(make_app):
    """A list, an object, or a nested structure where a scalar belongs; a number where a string
    belongs. (Booleans and numeric strings in number fields are refused too: tests/test_config.py.)"""
    async with running(make_app()) as client:
        for name, field in TrainConfig.model_fields.items():
            wrong = [{"a": 1}, [[1]], {"$gt": ""}]
            if name != "pairs_folds":
                wrong.append([1])
            if field.annotation in (str,) or "str" in str(field.annotation):
                wrong.append(12345)
            for value in wrong:
                await refused(client, with_fields(**{name: value}), name)
        await still_serving(client)


async def test_very_long_strings_are_refused_without_echo(make_app):
    async with running(make_app()) as client:
        for name, field in TrainConfig.model_fields.items():
            if "str" in str(field.annotation) or "Literal" in str(field.annotation):
                await refused(client, with_fields(**{name: "A" * 100_000}), name)
        await refused(client, with_fields(train="B" * 900_000), "train")
        # a 500 KB unknown key: named, but not echoed in full
        out = await refused(client, json.dumps({**VALID, "k" * 500_000: 1}), "kkkk")
        assert len(json.dumps(out)) < 4096
        await still_serving(client)


@pytest.mark.parametrize(
    "name,body,needle",
    [
        ("nesting 50000 deep", '{"train": ' + "[" * 50_000 + "]" * 50_000 + "}", "JSON"),
        ("an integer of 5000 digits", with_raw("epochs", "9" * 5000), ""),
        ("a string of invalid utf-8", b'{"train": "\xff\xfe"}', ""),
        ("a lone surrogate", '{"train": "\\ud800"}', "train"),
        (
            "duplicate keys, the last absolute",
            '{"train": "sample/train", "val": "sample/val", "train": "/etc"}',
            "train",
        ),
        ("a JSON string, not an object", '"sample/train"', ""),
        ("an array of configs", json.dumps([VALID, VALID]), ""),
    ],
)
async def test_parse_bombs_and_odd_json(make_app, name, body, needle):
    async with running(make_app()) as client:
        r = await post_raw(client, body)
        assert r.status_code in (400, 422), (name, r.status_code, r.text[:300])
        assert len(r.content) < 4096 and needle in r.json()["detail"], (name, r.text[:300])
        assert r.json()["detail"] != "There was an error parsing the body", "the message must name the problem"
        await still_serving(client)


async def test_a_body_that_is_not_json_says_so_and_names_the_body_not_an_offset(make_app):
    async with running(make_app()) as client:
        r = await post_raw(client, "not json")
        assert r.status_code == 422 and r.json()["field"] == "body", r.text
        assert r.json()["detail"].startswith("body: the body is not valid JSON")
        for ctype, body in (("text/plain", json.dumps(VALID)), ("application/x-www-form-urlencoded", "train=x")):
            r = await client.post("/jobs", content=body, headers={"content-type": ctype})
            assert r.status_code == 422 and r.json()["field"] == "body", (ctype, r.text)
            assert "Content-Type: application/json" in r.json()["detail"], (ctype, r.text)
        await still_serving(client)


PATH_FIELDS = {"train": "dir", "val": "dir", "pairs_file": "file", "pretrained_weights": "file"}
BAD_PATHS = [
    ("sample/train/..", "'..'"),
    ("./../outside", "'..'"),
    ("sample/./../../outside/eve", "'..'"),
    ("sample/train/../../../outside", "'..'"),
    ("..", "'..'"),
    ("sample\\..\\..\\outside", "not a relative"),
    ("/", "not a relative"),
    ("//etc", "not a relative"),
    ("/etc/passwd", "not a relative"),
    ("~root", "not a relative"),
    ("~/.ssh/id_rsa", "not a relative"),
    ("", "empty"),
    ("   ", "empty"),
    ("%2e%2e/outside", "does not exist"),
    ("..\u2215outside", "does not exist"),
    ("file:///etc/passwd", "does not exist"),
    ("C:\\Windows", "not a relative"),
    ("sample/train\x00/../..", "NUL"),
]


async def test_path_variants_in_every_path_field(make_app, data_dir):
    async with running(make_app()) as client:
        for field in PATH_FIELDS:
            for value, needle in BAD_PATHS:
                out = await refused(client, with_fields(**{field: value}), needle)
                assert out["field"] == field, (field, value, out)
            # absolute, even when it points inside the data root
            out = await refused(
                client, with_fields(**{field: str(data_dir / "sample" / "train")}), "not a relative path"
            )
            assert out["field"] == field
        await still_serving(client)


@pytest.fixture
def links(data_dir: Path, tmp_path: Path) -> Path:
    """Symbolic links in the data root: chains, loops, absolute and relative targets."""
    outside = tmp_path / "outside"
    (data_dir / "hop2").symlink_to(outside)
    (data_dir / "hop1").symlink_to(data_dir / "hop2")
    (data_dir / "loop").symlink_to(data_dir / "loop")
    (data_dir / "root").symlink_to("/")
    (data_dir / "relative_out").symlink_to("../outside")
    (data_dir / "secret_link").symlink_to(outside / "secret.txt")
    (data_dir / "inside_link").symlink_to(data_dir / "sample" / "train")
    return data_dir


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("train", "hop1", "outside the data root"),
        ("train", "hop1/eve", "outside the data root"),
        ("val", "relative_out", "outside the data root"),
        ("train", "root/etc", "outside the data root"),
        ("train", "loop", "cannot be resolved"),
        ("pairs_file", "secret_link", "outside the data root"),
        ("pretrained_weights", "secret_link", "outside the data root"),
        ("pretrained_weights", "hop1/secret.txt", "outside the data root"),
    ],
)
async def test_links_leaving_the_data_root_are_refused(make_app, links, field, value, needle):
    async with running(make_app()) as client:
        out = await refused(client, with_fields(**{field: value}), needle)
        assert out["field"] == field
        assert "secret" not in json.dumps(out).replace("secret_link", "").replace("secret.txt", "")
        await still_serving(client)


async def test_links_that_stay_inside_are_accepted(make_app, links, data_dir, tmp_path):
    async with running(make_app()) as client:
        r = await client.post("/jobs", json={**VALID, "train": "inside_link"})
        assert r.status_code == 202, r.text
        assert r.json()["config"]["train"] == str((data_dir / "sample" / "train").resolve())
    # the data root itself may be a link
    alias = tmp_path / "data_alias"
    alias.symlink_to(data_dir)
    async with running(make_app(data_dir=alias, models_dir=tmp_path / "models2")) as client:
        assert (await client.post("/jobs", json=VALID)).status_code == 202


@pytest.mark.parametrize("where", ["identity folder", "image file", "val identity folder"])
async def test_links_inside_the_training_folders_that_leave_the_root_are_refused(make_app, data_dir, tmp_path, where):
    """The trainer reads <train>/<identity>/<image>: a link planted at either level that points
    outside the data root would make a job read (and learn from) files elsewhere."""
    outside = tmp_path / "outside"
    if where == "identity folder":
        (data_dir / "sample" / "train" / "eve").symlink_to(outside / "eve")
        field = "train"
    elif where == "image file":
        (data_dir / "sample" / "train" / "ann" / "2.jpg").symlink_to(outside / "eve" / "1.jpg")
        field = "train"
    else:
        (data_dir / "sample" / "val" / "eve").symlink_to(outside / "eve")
        field = "val"
    async with running(make_app()) as client:
        out = await refused(client, json.dumps(VALID), "outside the data root")
        assert out["field"] == field
        await still_serving(client)
    # the same links pointing inside the root are fine
    for link in (
        data_dir / "sample" / "train" / "eve",
        data_dir / "sample" / "train" / "ann" / "2.jpg",
        data_dir / "sample" / "val" / "eve",
    ):
        if link.is_symlink():
            link.unlink()
    (data_dir / "sample" / "train" / "carl").mkdir()
    (data_dir / "sample" / "train" / "carl" / "1.jpg").write_bytes(image_bytes())
    (data_dir / "sample" / "train" / "dora").symlink_to(data_dir / "sample" / "train" / "carl")
    (data_dir / "sample" / "train" / "ann" / "3.jpg").symlink_to(data_dir / "sample" / "val" / "ann" / "1.jpg")
    # and so are broken links and link loops at either level (the trainer skips them)
    (data_dir / "sample" / "train" / "loop").symlink_to(data_dir / "sample" / "train" / "loop")
    (data_dir / "sample" / "train" / "ann" / "loop.jpg").symlink_to(data_dir / "sample" / "train" / "ann" / "loop.jpg")
    (data_dir / "sample" / "train" / "gone").symlink_to(data_dir / "nowhere")
    async with running(make_app()) as client:
        assert (await client.post("/jobs", json=VALID)).status_code == 202


async def test_a_link_swapped_in_after_submission_is_not_followed_by_the_stored_config(make_app, data_dir, tmp_path):
    """The stored config holds the resolved real paths: replacing the submitted path by a link
    later does not redirect the job."""
    async with running(make_app(max_queued_jobs=5)) as client:
        (data_dir / "current").symlink_to(data_dir / "sample" / "train")
        r = await client.post("/jobs", json={**VALID, "train": "current", "seed": 4})  # slow fake job
        assert r.status_code == 202
        (data_dir / "current").unlink()
        (data_dir / "current").symlink_to(tmp_path / "outside")
        job = (await client.get(f"/jobs/{r.json()['id']}")).json()
        assert job["config"]["train"] == str((data_dir / "sample" / "train").resolve())
        assert not os.path.realpath(job["config"]["train"]).startswith(str(tmp_path / "outside"))
        await client.post(f"/jobs/{r.json()['id']}/cancel")
