"""`edge-export evaluate --report`: one self-contained HTML file a quality engineer can open and send.

Everything is inline (charts as SVG, heat-map overlays as PNG, both as data: URIs; CSS in the page): no external
file, font, script or CDN, so the report renders the same offline, in a mail attachment or from a USB stick.
Sections: key numbers, the bundle's settings, ROC, score histogram with the threshold and the review band,
verdicts per label at the shipped threshold (OK / REVIEW / NG), and overlays of the worst-scored good parts and
the best-scored defects (the images a person should look at first).
"""
from __future__ import annotations

import base64
import datetime as dt
import html
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from export.metrics import roc_curve

N_OVERLAYS = 6          # per group: worst-scored good parts, best-scored defects
OVERLAY_SIDE = 256      # px, longest side of an overlay in the page


def verdict_of(score: float, threshold: float, review_threshold: float | None) -> str:
    """The device's decision for one score: NG at or above the threshold, REVIEW in [review, threshold), else OK."""
    if score >= threshold:
        return "NG"
    if review_threshold is not None and score >= review_threshold:
        return "REVIEW"
    return "OK"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _svg_img(svg: str, alt: str, width: int, height: int) -> str:
    uri = _data_uri("image/svg+xml", svg.encode("utf-8"))
    return f'<img class="chart" src="{uri}" alt="{_esc(alt)}" width="{width}" height="{height}">'


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def roc_svg(labels: np.ndarray, scores: np.ndarray, auroc: float | None, size: int = 340) -> str:
    """ROC curve as a standalone SVG document (false-positive rate on x, true-positive rate on y)."""
    fpr, tpr = roc_curve(labels, scores)
    m, w = 44, size - 60
    pts = " ".join(f"{m + f * w:.1f},{16 + (1 - t) * w:.1f}" for f, t in zip(fpr, tpr))
    ticks = "".join(
        f'<line x1="{m + v * w:.1f}" y1="{16 + w}" x2="{m + v * w:.1f}" y2="{20 + w}" stroke="#333"/>'
        f'<text x="{m + v * w:.1f}" y="{33 + w}" font-size="10" text-anchor="middle">{v:.1f}</text>'
        f'<line x1="{m - 4}" y1="{16 + (1 - v) * w:.1f}" x2="{m}" y2="{16 + (1 - v) * w:.1f}" stroke="#333"/>'
        f'<text x="{m - 6}" y="{19 + (1 - v) * w:.1f}" font-size="10" text-anchor="end">{v:.1f}</text>'
        for v in (0, 0.25, 0.5, 0.75, 1.0))
    title = f"image ROC, AUROC {auroc:.4f}" if auroc is not None else "image ROC"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>'
            f'<rect x="{m}" y="16" width="{w}" height="{w}" fill="none" stroke="#333"/>'
            f'<line x1="{m}" y1="{16 + w}" x2="{m + w}" y2="16" stroke="#999" stroke-dasharray="3,3"/>'
            f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>{ticks}'
            f'<text x="{m + w / 2}" y="{size - 4}" font-size="11" text-anchor="middle">false positive rate</text>'
            f'<text x="12" y="{16 + w / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {16 + w / 2})">true positive rate</text>'
            f'<text x="{m + w / 2}" y="12" font-size="12" text-anchor="middle">{_esc(title)}</text></svg>')


def histogram_svg(good: np.ndarray, defect: np.ndarray, threshold: float, review: float | None,
                  width: int = 560, height: int = 340, bins: int = 30) -> str:
    """Score histogram of good and defect images with the threshold (red) and the review band (shaded)."""
    marks = [threshold] + ([review] if review is not None else [])
    values = np.concatenate([good, defect, marks])
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0
    lo, hi = lo - 0.02 * span, hi + 0.02 * span
    edges = np.linspace(lo, hi, bins + 1)
    hg, _ = np.histogram(good, edges)
    hd, _ = np.histogram(defect, edges)
    top = max(1, int(max(hg.max(initial=0), hd.max(initial=0))))
    m, pw, ph, y0 = 44, width - 60, height - 70, 24

    def x(v: float) -> float:
        return m + (v - lo) / (hi - lo) * pw

    def bar_h(n: int) -> float:
        return n / top * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="white"/>']
    if review is not None:
        parts.append(f'<rect x="{x(review):.1f}" y="{y0}" width="{max(0.0, x(threshold) - x(review)):.1f}" '
                     f'height="{ph}" fill="#ffd54f" fill-opacity="0.45"/>')
    bw = pw / bins
    for counts, colour in ((hg, "#1f77b4"), (hd, "#ff7f0e")):
        for i, n in enumerate(counts):
            if n:
                parts.append(f'<rect x="{m + i * bw:.1f}" y="{y0 + ph - bar_h(n):.1f}" width="{bw:.1f}" '
                             f'height="{bar_h(n):.1f}" fill="{colour}" fill-opacity="0.6"/>')
    parts.append(f'<rect x="{m}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    for v in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x(v):.1f}" y="{y0 + ph + 14}" font-size="10" text-anchor="middle">{_fmt(v)}</text>')
    for n in (0, top // 2, top):
        yy = y0 + ph - bar_h(n)
        parts.append(f'<text x="{m - 6}" y="{yy + 3:.1f}" font-size="10" text-anchor="end">{n}</text>')
    parts.append(f'<line x1="{x(threshold):.1f}" y1="{y0}" x2="{x(threshold):.1f}" y2="{y0 + ph}" stroke="#d62728" '
                 'stroke-width="2"/>')
    legend = [("#1f77b4", f"good ({len(good)})"), ("#ff7f0e", f"defect ({len(defect)})"),
              ("#d62728", f"threshold {_fmt(threshold)}")]
    if review is not None:
        legend.append(("#ffd54f", f"review band from {_fmt(review)}"))
    lx = m
    for colour, text in legend:
        parts.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="15" font-size="11">{_esc(text)}</text>')
        lx += 22 + 6.5 * len(text)
    parts.append(f'<text x="{m + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">image score</text>')
    parts.append("</svg>")
    return "".join(parts)


def overlay_png(image_path: Path, amap: np.ndarray, threshold: float, shift_16bit: int = 8,
                roi: tuple[int, int, int, int] | None = None) -> bytes:
    """The heat map over the image (export.evaluate.overlay; `amap` covers the ROI if there is one), at most
    OVERLAY_SIDE px, PNG-encoded; a 16-bit image read as the bundle reads it (preprocessing.shift_16bit)."""
    from edge_runtime.decode import load_image
    from export.evaluate import overlay

    bgr = overlay(load_image(image_path, shift_16bit), amap, threshold, roi)
    scale = OVERLAY_SIDE / max(bgr.shape[:2])
    if scale < 1:
        bgr = cv2.resize(bgr, (round(bgr.shape[1] * scale), round(bgr.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise ValueError(f"{image_path}: could not encode the overlay as PNG")
    return buf.tobytes()


def confusion(item_labels: Sequence[str], scores: np.ndarray, threshold: float,
              review: float | None) -> dict[str, dict[str, int]]:
    """{label: {OK, REVIEW, NG}} at the shipped operating point, 'good' first, then defect types, then 'all defects'."""
    table: dict[str, dict[str, int]] = {}
    order = ["good"] + sorted({lab for lab in item_labels if lab != "good"})
    for lab in order:
        table[lab] = {"OK": 0, "REVIEW": 0, "NG": 0}
    for lab, s in zip(item_labels, scores):
        table[lab][verdict_of(float(s), threshold, review)] += 1
    defects = [t for lab, t in table.items() if lab != "good"]
    if len(defects) > 1:
        table["all defects"] = {k: sum(t[k] for t in defects) for k in ("OK", "REVIEW", "NG")}
    return table


def manifest_settings(manifest: dict, variant: str) -> list[tuple[str, str]]:
    """The bundle settings a reader needs to reproduce or question the result, as (name, value) rows."""
    def get(*keys: str, default: Any = "n/a") -> Any:
        node: Any = manifest
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return default
            node = node[k]
        return node

    geom = get("geometry", default={}) or {}
    if isinstance(geom.get("input_size"), list) and len(geom["input_size"]) == 2:
        w, h = geom["input_size"]
        tiles = len(geom.get("tiles") or [[0, 0]])
        size = f"{w} x {h} px" + (f", {tiles} tiles" if tiles > 1 else "") + f", size policy {geom.get('size_policy', '?')}"
        if geom.get("bundle_size_policy"):
            size += f" (evaluated with --size-policy; the bundle's is {geom['bundle_size_policy']})"
    else:
        size = "n/a"
    v = get("variants", variant, default={}) or {}
    method = (v.get("threshold_info") or {}).get("method", "n/a")
    rows = [("bundle id", get("bundle_id")), ("created", get("created")),
            ("backbone", get("backbone", "name")), ("input size", size),
            ("coreset ratio", get("coreset", "ratio")), ("bank images", get("coreset", "n_bank_images")),
            (f"bank size ({variant})", v.get("bank_size", "n/a")),
            (f"threshold ({variant})", _fmt(v["threshold"]) if "threshold" in v else "n/a"),
            ("threshold method", method), ("default variant", get("default_variant")),
            ("INT8 target", get("fit", "settings", "int8_target")), ("HNSW M / ef", f"{get('index', 'M')} / "
                                                                    f"{get('index', 'ef_search')}"),
            ("seeded walk (step / ef)", f"{get('index', 'seed_step')} / {get('index', 'ef_seeded')}"
             if get("index", "seed_step", default=0) else "off")]
    return [(k, str(val)) for k, val in rows]


_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px} td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} .ng{color:#b00020;font-weight:600} .rv{color:#8a6d00;font-weight:600}
.ok{color:#1b5e20;font-weight:600} .key{display:flex;gap:14px;flex-wrap:wrap;margin:12px 0}
.key div{background:#f5f7fa;border:1px solid #dde3ea;border-radius:6px;padding:8px 14px}
.key b{display:block;font-size:20px} .charts{display:flex;gap:20px;flex-wrap:wrap}
.grid{display:flex;gap:12px;flex-wrap:wrap} figure{margin:0;width:260px;font-size:12px}
figure img{max-width:256px;border:1px solid #ccc} .muted{color:#666;font-size:13px}
"""


def build_html(result: dict, item_paths: Sequence[Path], item_labels: Sequence[str], scores: np.ndarray,
               maps: Sequence[np.ndarray], threshold: float, manifest: dict) -> str:
    """The report page. `maps[i]` is the anomaly map of `item_paths[i]`; result is evaluate()'s dict."""
    scores = np.asarray(scores, dtype=float)
    is_defect = np.array([lab != "good" for lab in item_labels])
    review = result.get("review_threshold")
    engine = str(result.get("engine", "onnx-int8"))
    variant = "int8" if engine.endswith("int8") else "fp32"
    auroc = result.get("image_auroc")
    pix = result.get("pixel_auroc")
    table = confusion(item_labels, scores, threshold, review)
    good_t, defect_rows = table["good"], [t for k, t in table.items() if k != "good" and k != "all defects"]
    escapes = sum(t["OK"] for t in defect_rows)
    n_def = int(is_defect.sum())

    key = [("image AUROC", f"{auroc:.4f}" if auroc is not None else "n/a"),
           ("pixel AUROC", f"{pix:.4f}" if pix is not None else "n/a"),
           ("threshold", _fmt(threshold)), ("review from", _fmt(review) if review is not None else "none"),
           ("good rejected (NG)", f"{good_t['NG']} / {good_t['OK'] + good_t['REVIEW'] + good_t['NG']}"),
           ("good to review", str(good_t["REVIEW"])), ("defects passed (OK)", f"{escapes} / {n_def}")]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           f"<title>Inspection report {_esc(result.get('bundle_id', ''))}</title><style>{_CSS}</style></head><body>",
           f"<h1>Inspection report: bundle {_esc(result.get('bundle_id', 'n/a'))}</h1>",
           f'<div class="muted">{_esc(engine)} / {_esc(result.get("knn", ""))} search on '
           f'{_esc(result.get("data_dir", ""))}: {int((~is_defect).sum())} good, {n_def} defect images. '
           f'Written {dt.datetime.now().astimezone().isoformat(timespec="seconds")}.</div>',
           '<div class="key" id="key-numbers">' + "".join(f'<div>{_esc(k)}<b>{_esc(v)}</b></div>' for k, v in key)
           + "</div>"]

    faults = result.get("faults") or []
    if faults:
        out.append(f'<p class="ng" id="faults">{len(faults)} image(s) could not be inspected (FAULT on the station: '
                   f'rejected, never passed), not in the tables and charts below; the first: '
                   f'{_esc(faults[0]["error"])}</p>')
    out.append("<h2>Verdicts at the shipped threshold</h2>")
    out.append('<p class="muted">NG: score &ge; threshold. REVIEW: score in the review band (a person re-checks '
               "the part; never a pass). OK: below the band.</p>")
    out.append('<table id="confusion"><tr><th class="l">label</th><th>OK</th><th>REVIEW</th><th>NG</th>'
               "<th>images</th></tr>")
    for lab, t in table.items():
        total = sum(t.values())
        wrong = "OK" if lab != "good" else "NG"
        cells = "".join(f'<td class="{"ng" if k == wrong and t[k] else ""}">{t[k]}</td>'
                        for k in ("OK", "REVIEW", "NG"))
        out.append(f'<tr><td class="l">{_esc(lab)}</td>{cells}<td>{total}</td></tr>')
    out.append("</table>")

    out.append("<h2>Separation</h2><div class='charts'>")
    if auroc is not None:   # None: every good or every defect image faulted
        out.append(_svg_img(roc_svg(is_defect, scores, auroc), "ROC curve", 340, 340))
    out.append(_svg_img(histogram_svg(scores[~is_defect], scores[is_defect], threshold, review),
                        "score histogram with threshold and review band", 560, 340))
    out.append("</div>")
    if result.get("per_defect"):
        out.append('<table><tr><th class="l">defect type</th><th>AUROC vs good</th></tr>' + "".join(
            f'<tr><td class="l">{_esc(k)}</td><td>{"n/a" if v is None else f"{v:.4f}"}</td></tr>'
            for k, v in result["per_defect"].items())
                   + "</table>")

    order = np.argsort(-scores)
    shift_16bit = (manifest.get("preprocessing") or {}).get("shift_16bit", 8)   # read as the bundle reads frames
    roi = (manifest.get("geometry") or {}).get("roi")                            # where each region's map lies
    groups = (("Good parts with the highest scores (closest to a false reject)",
               [i for i in order if not is_defect[i]][:N_OVERLAYS], "good-overlays"),
              ("Defects with the lowest scores (closest to an escape)",
               [i for i in order[::-1] if is_defect[i]][:N_OVERLAYS], "defect-overlays"))
    for title, idx, css_id in groups:
        out.append(f"<h2>{_esc(title)}</h2><div class='grid' id='{css_id}'>")
        if not idx:
            out.append('<p class="muted">none in this set</p>')
        for i in idx:
            v = verdict_of(float(scores[i]), threshold, review)
            cls = {"NG": "ng", "REVIEW": "rv", "OK": "ok"}[v]
            uri = _data_uri("image/png", overlay_png(Path(item_paths[i]), maps[i], threshold, shift_16bit,
                                                       tuple(roi) if roi else None))
            out.append(f'<figure><img class="overlay" src="{uri}" alt="{_esc(Path(item_paths[i]).name)}">'
                       f"<figcaption>{_esc(item_labels[i])} / {_esc(Path(item_paths[i]).name)}<br>score "
                       f'{_fmt(float(scores[i]))} <span class="{cls}">{v}</span></figcaption></figure>')
        out.append("</div>")
    out.append('<p class="muted">Heat map: full red at twice the threshold, so red means above it.</p>')

    out.append("<h2>Bundle settings</h2><table id='settings'>" + "".join(
        f'<tr><th class="l">{_esc(k)}</th><td class="l">{_esc(v)}</td></tr>'
        # The geometry evaluated (result["geometry"] carries an --size-policy override), not only the bundle's.
        for k, v in manifest_settings({**manifest, "geometry": result.get("geometry") or manifest.get("geometry")},
                                      variant)) + "</table>")
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(path: Path, result: dict, items: Sequence, scores: np.ndarray, labels: np.ndarray,
                      maps: Sequence[np.ndarray], threshold: float, manifest: dict) -> Path:
    """Write the report to `path` (a .html file, or a folder that gets report.html); returns the file written.

    `items` have .path and .label (export.dataset.TestImage); `labels` (True = defect) must agree with them."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "report.html"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    item_labels = [it.label for it in items]
    if [lab != "good" for lab in item_labels] != [bool(x) for x in labels]:
        raise ValueError("write_html_report: labels disagree with the items' labels")
    page = build_html(result, [it.path for it in items], item_labels, np.asarray(scores), maps, threshold, manifest)
    path.write_text(page, encoding="utf-8")
    return path
