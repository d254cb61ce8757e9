"""The web page as the server sends it: GET / and /ui/*, open without the API key (they hold no
data), small, nothing from another origin; and GET /jobs/{id}/roc, the curve the page plots."""

from __future__ import annotations

import re

import pytest
from service_helpers import running, wait_job

from app.routes.ui import STATIC

pytestmark = pytest.mark.anyio


async def test_the_page_and_its_files_are_served_without_the_key_and_weigh_little(make_app):
    async with running(make_app(api_key="s3cret")) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        linked = [u for u in re.findall(r'(?:src|href)="([^"#]+)"', html) if u != "data:,"]  # no favicon fetch
        assert linked and all(u.startswith("/ui/") for u in linked), linked
        total = len(page.content)
        for url in linked:
            r = await client.get(url)
            assert r.status_code == 200, url
            total += len(r.content)
            # nothing leaves the server's origin: no absolute URL is fetched by the page
            assert not re.search(r"""(?:src=|href=|url\(|fetch\()\s*["']?(?:https?:)?//""", r.text), url
        assert total < 300_000
        assert {f.name for f in STATIC.iterdir()} == {"index.html", "app.js", "plot.js", "style.css"}
        # the data still needs the key
        assert (await client.get("/jobs")).status_code == 401
        assert (await client.get("/ui/../jobs")).status_code in (401, 404)


async def test_roc_of_a_job_is_the_best_epochs_curve(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json=job_body)).json()
        done = await wait_job(client, job["id"])
        assert done["status"] == "succeeded"
        r = await client.get(f"/jobs/{job['id']}/roc")
        assert r.status_code == 200, r.text
        roc = r.json()
        assert roc["epoch"] == done["best"]["epoch"] == 2
        assert len(roc["far"]) == len(roc["tar"]) == len(roc["threshold"]) and roc["thresholds"]["far_1e-3"] == 0.9
        assert (await client.get("/jobs/" + "0" * 32 + "/roc")).status_code == 404


async def test_roc_before_any_epoch_is_404_saying_why(make_app, job_body):
    async with running(make_app()) as client:
        job = (await client.post("/jobs", json={**job_body, "seed": 1})).json()  # data error: no epoch
        await wait_job(client, job["id"])
        r = await client.get(f"/jobs/{job['id']}/roc")
        assert r.status_code == 404 and "has no ROC yet" in r.json()["detail"], r.text


async def test_data_lists_what_a_job_can_train_on_and_no_further(make_app, data_dir):
    (data_dir / "lfw" / "split" / "train" / "Ann_A").mkdir(parents=True)
    (data_dir / "lfw" / "split" / "train" / "Ann_A" / "1.png").write_bytes(b"x")
    (data_dir / "lfw" / "split" / "train" / "Bob_B").mkdir()
    (data_dir / "lfw" / "split" / "train" / "Bob_B" / "1.jpg").write_bytes(b"x")
    (data_dir / "lfw" / "pairs.txt").write_text("10\t300\nAnn_A\t1\t2\n")
    (data_dir / "lfw" / "notes.txt").write_text("just notes\n")
    async with running(make_app()) as client:
        r = await client.get("/data")
        assert r.status_code == 200, r.text
        body = r.json()
        folders = {f["path"]: f["people"] for f in body["folders"]}
        # the fixture's sample/train and sample/val have two people each; escape/ links outside
        assert folders == {"sample/train": 2, "sample/val": 2, "lfw/split/train": 2}, folders
        assert sorted(body["pairs_files"]) == ["lfw/pairs.txt", "sample/pairs.txt"]
