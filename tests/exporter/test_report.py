"""The evaluate report: one self-contained HTML file, checked by opening it in a real headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.dataset import TestImage as Item  # aliased: pytest would try to collect a Test* class
from export.report import confusion, histogram_svg, verdict_of, write_html_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def open_in_chromium(page: Path, screenshot: Path | None = None) -> dict:
    """Load `page` in headless Chromium (the system binary and driver; nothing is downloaded) and return what
    rendered: every <img> with its natural width, the page text, and any request that left the file."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver (.ci/run does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(page.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.className]);")
        text = driver.execute_script("return document.body.innerText;")
        confusion_rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('#confusion tr')).slice(1)"
            ".map(r => Array.from(r.cells).map(c => c.innerText));")
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight;")
            driver.set_window_size(1300, min(int(height) + 200, 8000))   # window > viewport by the frame
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return {"images": images, "text": text, "urls": urls, "confusion": {r[0]: r[1:] for r in confusion_rows}}


def _fake_eval(tmp_path: Path, review: float | None):
    """Real image files and maps, scores chosen so that every verdict occurs."""
    rng = np.random.default_rng(0)
    items, scores, maps = [], [], []
    plan = [("good", s) for s in (0.5, 0.7, 0.9, 1.05, 1.3)] + [("crack", s) for s in (0.95, 1.6, 2.0)] + \
           [("dent", s) for s in (1.02, 2.5)]
    for i, (label, score) in enumerate(plan):
        p = tmp_path / "imgs" / f"{label}_{i}.png"
        p.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(p), rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
        items.append(Item(p, label, None))
        scores.append(score)
        maps.append(rng.random((224, 224)).astype(np.float32) * score)
    scores = np.array(scores)
    labels = np.array([it.is_defect for it in items])
    result = {"bundle": str(tmp_path / "b"), "bundle_id": "feedc0de1234", "data_dir": "line-7 photos",
              "engine": "onnx-int8", "knn": "hnsw", "image_auroc": 0.9286, "pixel_auroc": None,
              "threshold": 1.0, "review_threshold": review, "per_defect": {"crack": 0.9333, "dent": 1.0},
              "images": [{"file": str(it.path), "label": it.label, "score": float(s)} for it, s in zip(items, scores)]}
    manifest = {"bundle_id": "feedc0de1234", "backbone": {"name": "lite0"}, "geometry": {"input_size": [224, 224], "tiles": [[0, 0]], "size_policy": "refuse"},
                "coreset": {"ratio": 0.01, "n_bank_images": 188}, "default_variant": "int8",
                "variants": {"int8": {"bank_size": 1474, "threshold": 1.0,
                                      "threshold_info": {"method": "defect-aware: midpoint"}}},
                "fit": {"settings": {"int8_target": "arm"}}, "index": {"M": 16, "ef_search": 32}}
    return items, scores, labels, maps, result, manifest


def test_verdicts_follow_the_threshold_and_review_band():
    assert verdict_of(1.0, 1.0, 0.8) == "NG" and verdict_of(0.9, 1.0, 0.8) == "REVIEW"
    assert verdict_of(0.79, 1.0, 0.8) == "OK" and verdict_of(0.99, 1.0, None) == "OK"
    t = confusion(["good", "good", "crack", "dent", "dent"], np.array([0.5, 0.9, 0.85, 1.2, 0.1]), 1.0, 0.8)
    assert t == {"good": {"OK": 1, "REVIEW": 1, "NG": 0}, "crack": {"OK": 0, "REVIEW": 1, "NG": 0},
                 "dent": {"OK": 1, "REVIEW": 0, "NG": 1}, "all defects": {"OK": 1, "REVIEW": 1, "NG": 1}}


@pytest.mark.parametrize("review", [0.9, None])
def test_report_is_one_self_contained_file(tmp_path, review):
    items, scores, labels, maps, result, manifest = _fake_eval(tmp_path, review)
    if review is None:
        del result["review_threshold"]        # evaluate() before the review band existed
    out = write_html_report(tmp_path / "rep", result, items, scores, labels, maps, 1.0, manifest)
    assert out == tmp_path / "rep" / "report.html" and list(out.parent.iterdir()) == [out]
    page = out.read_text()
    # Nothing outside the file: every src/href is a data: URI, no scripts, stylesheets or fonts are fetched.
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:image/") for r in refs)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count('class="overlay"') == 5 + 5 and page.count('class="chart"') == 2
    hist = histogram_svg(scores[~labels], scores[labels], 1.0, result.get("review_threshold"))
    assert ("review band from 0.9" in hist) == (review is not None) and "threshold 1" in hist
    assert ('fill="#ffd54f"' in hist.split("<text")[0]) == (review is not None)    # the shaded band itself


def test_report_renders_in_headless_chromium(tmp_path):
    items, scores, labels, maps, result, manifest = _fake_eval(tmp_path, 0.9)
    out = write_html_report(tmp_path / "report.html", result, items, scores, labels, maps, 1.0, manifest)
    shot = tmp_path / "report.png"
    seen = open_in_chromium(out, shot)
    imgs = seen["images"]
    assert len(imgs) == 12 and all(complete and width > 0 for _, complete, width, _ in imgs), imgs
    assert sorted(c for *_, c in imgs).count("overlay") == 10
    assert all(u.startswith(("file:", "data:")) for u in seen["urls"]), seen["urls"]
    text = seen["text"]
    for needle in ("Inspection report: bundle feedc0de1234", "image AUROC\n0.9286", "threshold\n1",
                   "review from\n0.9", "good rejected (NG)\n2 / 5", "good to review\n1",
                   "defects passed (OK)\n0 / 5", "lite0", "224 x 224 px, size policy refuse", "0.01", "1474",
                   "defect-aware: midpoint", "arm"):
        assert needle in text, needle
    # The verdict table at the shipped operating point (threshold 1.0, review from 0.9).
    rows = seen["confusion"]
    assert rows["good"] == ["2", "1", "2", "5"] and rows["crack"] == ["0", "1", "2", "3"]
    assert rows["dent"] == ["0", "0", "2", "2"] and rows["all defects"] == ["0", "1", "4", "5"]
    png = cv2.imread(str(shot))
    assert png is not None and png.shape[0] > 900 and png.std() > 10     # a real, non-blank full-page capture


def test_evaluate_report_from_a_real_bundle_renders(small_bundle, synthetic_dataset, tmp_path):
    from export.cli import main as export_main

    rc = export_main(["evaluate", str(small_bundle), str(synthetic_dataset), "--json", str(tmp_path / "r.json"),
                      "--report", str(tmp_path / "rep")])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    seen = open_in_chromium(tmp_path / "rep" / "report.html", tmp_path / "rep.png")
    assert len(seen["images"]) == 14 and all(c and w > 0 for _, c, w, _ in seen["images"])
    assert f"image AUROC\n{r['image_auroc']:.4f}" in seen["text"] and r["bundle_id"] in seen["text"]


def test_an_roi_heat_map_is_drawn_on_its_roi_not_stretched_over_the_frame():
    import numpy as np

    from export.evaluate import overlay

    rgb = np.full((100, 300, 3), 90, np.uint8)
    amap = np.zeros((60, 50), np.float32)
    amap[30, 25] = 100.0                                      # hot in the middle of the ROI
    out = overlay(rgb, amap, threshold=1.0, roi=(200, 20, 50, 60))
    assert out.shape == (100, 300, 3)
    assert (out[:, :190] == 90).all()                         # left of the ROI: the frame as it is
    hot = np.unravel_index(np.argmax(out[..., 2].astype(int) - out[..., 0]), out.shape[:2])
    assert 200 <= hot[1] < 250 and 20 <= hot[0] < 80          # the red lies inside the ROI
    whole = overlay(rgb[20:80, 200:250].copy(), amap, threshold=1.0)
    assert np.array_equal(out[21:79, 201:249], whole[1:59, 1:49])   # inside: as a map of the ROI alone


def test_a_size_policy_override_is_what_the_report_and_json_say_was_evaluated(small_bundle, synthetic_dataset,
                                                                              tmp_path):
    from export.cli import main as export_main

    rc = export_main(["evaluate", str(small_bundle), str(synthetic_dataset), "--json", str(tmp_path / "r.json"),
                      "--report", str(tmp_path / "rep"), "--size-policy", "resize"])
    assert rc == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["geometry"]["size_policy"] == "resize" and r["geometry"]["bundle_size_policy"] == "refuse"
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "size policy resize (evaluated with --size-policy; the bundle&#x27;s is refuse)" in html   # escaped
