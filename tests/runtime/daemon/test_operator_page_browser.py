"""The operator's page as a person uses it: real headless Chromium, a running daemon, real bottle frames.

A station whose threshold rejects one good bottle (the highest-scored test/good image; every defect stays above it)
inspects real frames; the browser sees the verdict, overlay and charts drawn, logs in, opens the false reject,
clicks "This part is good", reads the preview, applies it, and sees the same part come back OK. Screenshots go to
the test's tmp folder, and also to $EDGE_PAGE_SCREENSHOTS when set (benchmarks/results/page_screenshots).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pytest
from extras import require

require("starlette", "page")
require("uvicorn", "page")

from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, write_manifest  # noqa: E402
from edge_runtime.decode import load_image  # noqa: E402
from edge_runtime.operator_page.auth import hash_password  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def strict_copy(bundle: Path, bottle_dir: Path, out: Path) -> tuple[Path, Path, list[Path]]:
    """`bundle` with a threshold that rejects exactly the highest-scored good test image; returns it, that image
    and the other images to show (good ones and defects, all on the right side of the threshold)."""
    pipe = Pipeline(Bundle.load(bundle), threads=2)
    goods = sorted(((pipe.score_rgb(load_image(p)).score, p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))),
                   reverse=True)
    defects = [p for d in ("broken_large", "contamination") for p in sorted((bottle_dir / "test" / d).glob("*.png"))[:1]]
    threshold = (goods[0][0] + goods[1][0]) / 2
    assert all(pipe.score_rgb(load_image(p)).score > threshold for p in defects)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(MANIFEST, SIGNATURE))
    m = copy.deepcopy(Bundle.load(bundle).manifest)
    name = m["default_variant"]
    m["variants"] = {name: {**m["variants"][name], "threshold": threshold, "review_threshold": None}}
    m["bundle_id"] = None
    m.pop("files")
    write_manifest(out, m)
    return out, goods[0][1], [goods[-1][1], goods[-2][1], *defects]


def chromium():
    """Headless Chromium (the Debian binary) under selenium."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver (.ci/run does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,950"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class patient:
    """A 60 s wait that also retries an element the page replaced meanwhile (a redirect, a live update).

    Chromedriver reports a node swapped out between its lookup and its read in two ways: as a stale element,
    or, while a navigation is under way, as a generic inspector error "Node with given id does not belong to
    the document" (seen in CI after the login redirect). Both mean "look again"; any other error still fails."""

    def __init__(self, driver):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self._wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,
                                                                   NoSuchElementException))

    def until(self, condition):
        from selenium.common.exceptions import WebDriverException

        def retried(driver):
            try:
                return condition(driver)
            except WebDriverException as e:
                if "does not belong to the document" in str(e):
                    return False
                raise
        return self._wait.until(retried)


def feed(folder: Path, image: Path, name: str) -> None:
    shutil.copyfile(image, folder / (name + ".tmp"))
    (folder / (name + ".tmp")).rename(folder / name)


def part_id(port: int, name: str, timeout: float = 60.0, line: str = "") -> int:
    """Frame id of the part whose source file is `name`, once the page has it."""
    import json
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{line}/api/parts", timeout=10) as r:
                for p in json.load(r):
                    if p["source"].endswith("/" + name):
                        return p["frame_id"]
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} was not inspected")


@pytest.mark.realdata
@pytest.mark.exporter   # fits the bottle bundle
def test_false_reject_learned_from_the_page_in_chromium(request, bottle_dir, tmp_path, write_station,
                                                         free_port, start_station):
    from selenium.webdriver.common.by import By

    # $EDGE_PAGE_BOTTLE_BUNDLE: a bottle bundle already fitted with `edge-export fit` (screenshots of the default one)
    source = Path(os.environ.get("EDGE_PAGE_BOTTLE_BUNDLE") or request.getfixturevalue("bottle_bundle"))
    bundle, rejected, others = strict_copy(source, bottle_dir, tmp_path / "strict")
    folder = tmp_path / "in"
    folder.mkdir()
    port = free_port()
    users = [{"name": "otto", "role": "operator", "password_hash": hash_password("pw", n=2 ** 10)}]
    start_station(write_station(bundle=bundle, source={"type": "folder", "path": "in", "mode": "watch",
                                                              "process_existing": True},
                                state_dir="state", inference={"threads": 2},
                                page={"enabled": True, "port": port, "users": users}))
    shots = [tmp_path / "shots"]
    if os.environ.get("EDGE_PAGE_SCREENSHOTS"):
        shots.append(Path(os.environ["EDGE_PAGE_SCREENSHOTS"]))
    for s in shots:
        s.mkdir(parents=True, exist_ok=True)

    driver = chromium()
    wait = patient(driver)

    def shot(name: str) -> None:
        for s in shots:
            driver.save_screenshot(str(s / name))

    base = f"http://127.0.0.1:{port}"
    try:
        for i, image in enumerate(others):
            feed(folder, image, f"{i:02d}_{image.parent.name}_{image.name}")
        part_id(port, f"{len(others) - 1:02d}_{others[-1].parent.name}_{others[-1].name}")
        feed(folder, rejected, "10_good_rejected.png")
        fid = part_id(port, "10_good_rejected.png")
        driver.get(base + "/")
        # Live view: verdict of the latest part (the false reject) in large type, overlay loaded, charts drawn.
        wait.until(lambda d: d.find_element(By.ID, "partlink").text == f"part {fid}")
        assert driver.find_element(By.ID, "verdict").text == "NG"
        wait.until(lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") > 0)
        wait.until(lambda d: int(d.find_element(By.ID, "trend").get_attribute("data-points")) == len(others) + 1)
        assert int(driver.find_element(By.ID, "hist").get_attribute("data-points")) == len(others) + 1
        wait.until(lambda d: "yield" in d.find_element(By.ID, "status").text)
        shot("live_view.png")

        driver.get(base + "/login")
        driver.find_element(By.ID, "name").send_keys("otto")
        driver.find_element(By.ID, "password").send_keys("pw")
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: "otto (operator)" in d.find_element(By.TAG_NAME, "nav").text)

        driver.get(base + "/history")
        cards = driver.find_elements(By.CSS_SELECTOR, "#history a.card")
        assert len(cards) == len(others) + 1
        wait.until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.naturalWidth > 0)"))
        shot("history.png")
        driver.get(base + "/history?verdict=NG")
        ng_cards = driver.find_elements(By.CSS_SELECTOR, "#history a.card")
        assert len(ng_cards) == 3   # the false reject and the two defects
        driver.find_element(By.CSS_SELECTOR, f'a.card[href="/part/{fid}"]').click()

        wait.until(lambda d: d.find_element(By.ID, "good"))
        driver.find_element(By.ID, "good").click()
        wait.until(lambda d: d.find_element(By.ID, "apply").is_enabled())
        afters = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#dlgbody td.after")]
        assert afters[0] == "OK", afters
        shot("feedback_dialog.png")
        driver.find_element(By.ID, "apply").click()
        wait.until(lambda d: "is in service" in d.find_element(By.ID, "dlgbody").text)

        driver.get(base + "/")
        feed(folder, rejected, "11_good_rejected_again.png")
        again = part_id(port, "11_good_rejected_again.png")
        wait.until(lambda d: d.find_element(By.ID, "partlink").text == f"part {again}")  # live update (SSE)
        wait.until(lambda d: d.find_element(By.ID, "verdict").text == "OK")
        shot("live_view_after_learning.png")
    finally:
        driver.quit()


def test_one_page_for_two_lines_in_chromium(device_bundle, tmp_path, write_station, free_port, start_station):
    """The overview lists both lines with their last verdict; a line's live view shows that line's parts only and
    follows them live; the selector goes to the other line. Device bundle: no exporter, no real data."""
    import cv2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    good = tmp_path / "good.png"
    shutil.copyfile(device_bundle / "golden" / "00_good.png", good)
    marked = tmp_path / "marked.png"
    img = cv2.imread(str(good))
    cv2.circle(img, (60, 80), 12, (0, 0, 255), -1)
    cv2.imwrite(str(marked), img)
    folders = {n: tmp_path / f"in_{n}" for n in ("left", "right")}
    for f in folders.values():
        f.mkdir()
    port = free_port()
    start_station(write_station(bundle=device_bundle, state_dir="state", inference={"threads": 2},
                                lines=[{"name": n, "source": {"type": "folder", "path": str(f), "mode": "watch",
                                                                    "process_existing": True}}
                                       for n, f in folders.items()],
                                page={"enabled": True, "port": port}))
    feed(folders["left"], marked, "l1.png")
    feed(folders["right"], good, "r1.png")
    left1 = part_id(port, "l1.png", line="/line/left")
    part_id(port, "r1.png", line="/line/right")
    driver = chromium()
    wait = patient(driver)
    base = f"http://127.0.0.1:{port}"
    shots = [tmp_path / "shots"] + ([Path(os.environ["EDGE_PAGE_SCREENSHOTS"])] if os.environ.get("EDGE_PAGE_SCREENSHOTS") else [])

    def shot(name: str) -> None:
        for s in shots:
            s.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(s / name))

    try:
        driver.get(base + "/")
        rows = {r.get_attribute("data-line"): r.text for r in driver.find_elements(By.CSS_SELECTOR, "#overview tr[data-line]")}
        assert set(rows) == {"left", "right"} and "NG" in rows["left"] and "OK" in rows["right"], rows
        feed(folders["right"], marked, "r2.png")
        part_id(port, "r2.png", line="/line/right")
        # The overview refreshes itself (every OVERVIEW_PERIOD_S): right's last verdict is now NG.
        wait.until(lambda d: "NG" in d.find_element(By.CSS_SELECTOR, '#overview tr[data-line="right"]').text)
        shot("lines_overview.png")
        driver.find_element(By.CSS_SELECTOR, '#overview a[href="/line/left/"]').click()

        wait.until(lambda d: d.find_element(By.ID, "partlink").text == f"part {left1}")
        assert driver.find_element(By.ID, "verdict").text == "NG"
        wait.until(lambda d: d.execute_script("return document.getElementById('overlay').naturalWidth") > 0)
        wait.until(lambda d: "yield" in d.find_element(By.ID, "status").text)
        assert int(driver.find_element(By.ID, "trend").get_attribute("data-points")) == 1
        # A part on the left line comes in live; one on the right line does not touch this view.
        feed(folders["right"], good, "r3.png")
        right3 = part_id(port, "r3.png", line="/line/right")
        feed(folders["left"], good, "l2.png")
        left2 = part_id(port, "l2.png", line="/line/left")
        wait.until(lambda d: d.find_element(By.ID, "partlink").text == f"part {left2}")
        wait.until(lambda d: d.find_element(By.ID, "verdict").text == "OK")
        wait.until(lambda d: int(d.find_element(By.ID, "trend").get_attribute("data-points")) == 2)
        assert driver.find_element(By.CSS_SELECTOR, "#partlink a").get_attribute("href") == f"{base}/line/left/part/{left2}"
        # The selector, kept current by the live stream, goes to the other line.
        wait.until(lambda d: "right - ready - OK" in d.find_element(By.ID, "lineselect").text)
        shot("line_live_view.png")
        Select(driver.find_element(By.ID, "lineselect")).select_by_value("right")
        wait.until(lambda d: d.current_url == f"{base}/line/right/")
        wait.until(lambda d: int(d.find_element(By.ID, "trend").get_attribute("data-points")) == 3)
        wait.until(lambda d: d.find_element(By.ID, "partlink").text == f"part {right3}")
        assert driver.find_element(By.ID, "verdict").text == "OK"
    finally:
        driver.quit()
