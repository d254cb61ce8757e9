"""The web page in a real browser (headless Chromium driven by Selenium) against a real server
with the real trainer: start a small job from the form, watch it succeed, see its curves, verify
two photos, enroll people in a gallery and identify a photo, and check that no request leaves the
server's origin.

Needs Debian's chromium and chromium-driver (scripts/test.sh installs them where it can); skips
without them. With FACEID_SCREENSHOTS_DIR set, saves a screenshot of each page there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from real_server import REPO, real_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SAMPLE = REPO / "data" / "sample"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
]

# a small job: 2 short epochs at 32 px on the shipped sample (faces found and aligned)
EXTRA = '{"batch_size": 16, "max_steps_per_epoch": 5, "eval_pairs": 500, "workers": 0, "progress_step_pct": 10}'


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--disable-gpu",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("FACEID_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _wait(driver, seconds: float, what: str, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.5).until(condition, message=what)


def test_train_watch_and_verify_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By

    with real_server(tmp_path) as (base, proc, log_path):
        browser.get(base + "/#/jobs")
        form = _wait(browser, 30, "the start form", lambda d: d.find_element(By.ID, "new-job"))
        form.find_element(By.NAME, "epochs").send_keys("2")
        form.find_element(By.NAME, "img_size").send_keys("32")
        form.find_element(By.NAME, "extra").send_keys(EXTRA)
        teacher = importlib.util.find_spec("dlib") is not None  # the [teacher] extra (scripts/setup.sh)
        if teacher:
            from selenium.webdriver.support.ui import Select

            Select(form.find_element(By.NAME, "distill")).select_by_value("dlib")
        _shot(browser, "jobs")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

        # the form takes us to the job's page; it follows the job until it has succeeded
        _wait(browser, 20, "the job's page", lambda d: "#/jobs/" in d.current_url)
        job_id = browser.current_url.rsplit("/", 1)[-1]
        assert len(job_id) == 32

        def finished(d):  # the page redraws every 2 s: read the state in the browser, at once
            state = d.execute_script("const e = document.querySelector('[data-status]'); return e && e.dataset.status")
            return state if state in ("succeeded", "failed") else None

        status = _wait(browser, 600, "the job to finish", finished)
        assert status == "succeeded", log_path.read_text()[-3000:]
        config = httpx.get(f"{base}/jobs/{job_id}").json()["config"]
        assert config["distill"] == ("dlib" if teacher else "none")  # the form's teacher reached the job

        # where the job's time went: each part with its share of the wall time
        split = _wait(
            browser,
            30,
            "the time split",
            lambda d: (lambda t: t if "train " in t and "%" in t else None)(d.find_element(By.ID, "time-split").text),
        )
        assert all(part in split for part in ("setup", "eval", "checkpoints")), split

        # curves: loss and validation metrics with a point per epoch, and the ROC with its
        # operating points marked
        def plotted(d):
            series = d.execute_script(
                "return Object.fromEntries([...document.querySelectorAll('svg path.series')]"
                ".map(e => [e.dataset.name, Number(e.dataset.points)]))"
            )
            has_roc = any(name.startswith("epoch ") for name in series)
            return series if series.get("train_loss") == 2 and has_roc else None

        series = _wait(browser, 30, "the curves", plotted)
        assert series["train_loss"] == 2 and series["auc"] == 2 and series["acc"] == 2, series
        roc_points = max(v for k, v in series.items() if k.startswith("epoch "))
        assert roc_points > 5, series
        markers = set(
            browser.execute_script("return [...document.querySelectorAll('svg g.marker text')].map(e => e.textContent)")
        )
        assert "acc" in markers, markers
        _wait(browser, 30, "the job's model served", lambda d: job_id[:8] in d.find_element(By.ID, "served").text)
        _shot(browser, "job")

        # compare: the job's curves and ROC on the shared plots (the job page's plots stay on
        # screen until the compare view has loaded the jobs and replaced them: wait for its own)
        browser.get(base + f"/#/compare/{job_id}")

        def compare_plots(d):
            names = d.execute_script(
                "return [...document.querySelectorAll('svg path.series')].map(e => e.dataset.name)"
            )
            return names if any(job_id[:8] in (n or "") for n in names or []) else None

        compared = _wait(browser, 30, "the compare plots", compare_plots)
        assert compared.count(job_id[:8]) >= 2 and f"{job_id[:8]}" in compared, compared

        # verify two photos of one person: the answer, and the faces drawn
        person = next(d for d in sorted((SAMPLE / "val").iterdir()) if len(list(d.glob("*.jpg"))) >= 2)
        a, b = sorted(person.glob("*.jpg"))[:2]
        browser.get(base + "/#/try")
        _wait(browser, 20, "the try page", lambda d: d.find_element(By.ID, "verify"))
        browser.find_element(By.NAME, "image1").send_keys(str(a))
        browser.find_element(By.NAME, "image2").send_keys(str(b))
        browser.find_element(By.ID, "verify").click()
        verdict = _wait(
            browser, 60, "the verify answer", lambda d: d.find_element(By.CSS_SELECTOR, "#verify-result .verdict")
        )
        assert verdict.text in ("Same person", "Different people")
        result = browser.find_element(By.ID, "verify-result")
        assert "similarity" in result.text and job_id[:8] in result.text
        assert int(result.get_attribute("data-faces")) == 2  # a box and landmarks drawn on each photo
        widths = [c.get_attribute("width") for c in browser.find_elements(By.CSS_SELECTOR, ".photo canvas")]
        assert all(int(w) > 0 for w in widths), widths
        _shot(browser, "try")
        # an iPhone's HEIC, which the server reads and this browser cannot show: the first photo's
        # preview goes (no face drawn on the earlier photo), a note says why, and it is verified
        browser.find_element(By.NAME, "image1").send_keys(
            str(Path(__file__).resolve().parents[1] / "fixtures/scene.heic")
        )
        note = _wait(
            browser, 20, "the no-preview note", lambda d: d.find_element(By.CSS_SELECTOR, ".photo .muted").text
        )
        assert "no preview" in note
        browser.find_element(By.ID, "verify").click()
        _wait(  # the new answer: a face drawn on the second photo only
            browser,
            60,
            "the HEIC's answer",
            lambda d: d.find_element(By.ID, "verify-result").get_attribute("data-faces") == "1",
        )
        assert "similarity" in browser.find_element(By.ID, "verify-result").text
        widths = [c.get_attribute("width") for c in browser.find_elements(By.CSS_SELECTOR, ".photo canvas")]
        assert int(widths[0]) == 0 and int(widths[1]) > 0, widths

        # a gallery: create it, enroll two people, ask who a third photo of one of them is
        browser.get(base + "/#/galleries")
        form = _wait(browser, 20, "the gallery form", lambda d: d.find_element(By.ID, "new-gallery"))
        form.find_element(By.NAME, "name").send_keys("staff")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        _wait(browser, 20, "the gallery's page", lambda d: d.current_url.endswith("#/galleries/staff"))
        people = [d for d in sorted((SAMPLE / "val").iterdir()) if len(list(d.glob("*.jpg"))) >= 3][:2]
        for who in people:
            enroll = _wait(browser, 20, "the enroll form", lambda d: d.find_element(By.ID, "enroll"))
            enroll.find_element(By.NAME, "person").send_keys(who.name)
            enroll.find_element(By.NAME, "images").send_keys("\n".join(str(f) for f in sorted(who.glob("*.jpg"))[:2]))
            enroll.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            _wait(
                browser,
                60,
                f"{who.name} enrolled",
                lambda d, name=who.name: name in d.find_element(By.ID, "people").text,
            )
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#people tr')].slice(1)"
            ".map(r => [r.cells[0].textContent, Number(r.cells[1].textContent)])"
        )
        assert sorted(rows) == sorted([who.name, 2] for who in people), rows
        browser.find_element(By.NAME, "image").send_keys(str(sorted(people[0].glob("*.jpg"))[2]))
        browser.find_element(By.ID, "identify").click()
        verdict = _wait(
            browser,
            60,
            "the identify answer",
            lambda d: d.find_element(By.CSS_SELECTOR, "#identify-result .verdict").text,
        )
        # a tiny model may not know them apart; the page shows its answer and the face found
        assert verdict in {who.name for who in people} | {"unknown"}, verdict
        assert "candidates" in browser.find_element(By.ID, "identify-result").text
        _wait(
            browser,
            10,
            "the probe drawn",
            lambda d: int(d.find_element(By.CSS_SELECTOR, ".photo canvas").get_attribute("width")) > 0,
        )
        _shot(browser, "galleries")
        # a group photo, the two people small in it: their faces are found when asked for
        from PIL import Image

        from faceid.scenes import background

        group = background((2400, 1200), np.random.default_rng(4))
        for who, x in zip(people, (500, 1700)):
            group.paste(Image.open(sorted(who.glob("*.jpg"))[2]).convert("RGB").resize((110, 110)), (x, 450))
        group.save(tmp_path / "group.jpg", quality=92)
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.NAME, "min_face")).select_by_value("2")
        browser.find_element(By.NAME, "image").send_keys(str(tmp_path / "group.jpg"))
        browser.find_element(By.ID, "identify").click()
        found = _wait(
            browser,
            60,
            "the group photo's faces",
            lambda d: re.search(r"· ([2-9]) face\(s\)", d.find_element(By.ID, "identify-result").text),
        )
        assert int(found.group(1)) >= 2

        browser.get(base + "/#/models")
        _wait(browser, 20, "the models page", lambda d: d.find_element(By.ID, "served-id"))
        assert browser.find_element(By.ID, "served-id").text == job_id[:8]
        _shot(browser, "models")

        # no script error on any page, and everything the page loaded came from the server itself
        # (answers such as /model's 503 before the first model are the API's, and the page shows them)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] == "javascript"]
        assert not errors, errors
        urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(base + "/") for u in urls), urls


def test_the_page_asks_for_the_key_and_keeps_it_for_the_session(browser, tmp_path):
    from selenium.webdriver.common.by import By

    with real_server(tmp_path, api_key="s3cret-key") as (base, proc, log_path):
        browser.get(base + "/#/jobs")
        banner = _wait(browser, 20, "the refusal", lambda d: d.find_element(By.ID, "banner").text or None)
        assert "401" in banner and "API key" in banner, banner
        browser.find_element(By.ID, "api-key").send_keys("s3cret-key")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        _wait(browser, 20, "the job list", lambda d: "0 job(s)" in d.find_element(By.ID, "view").text)
        # kept for the session: a reload needs no key again
        browser.refresh()
        _wait(browser, 20, "the job list again", lambda d: "0 job(s)" in d.find_element(By.ID, "view").text)
        assert browser.execute_script("return sessionStorage.getItem('faceid-api-key')") == "s3cret-key"
