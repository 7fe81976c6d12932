"""What every benchmark script shares: the machine and its load during the run, Markdown tables, results files.

A timing on a shared 2-core machine means little without how busy the machine was, so each script wraps its
measurements in a `LoadMonitor` that reports the CPU time other processes took while it ran.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.bench import THREAD_ENV, cpu_info, load_average, software_info

RESULTS = Path(__file__).resolve().parent / "results"


def command_line() -> str:
    """The command as a reader would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMonitor:
    """CPU time used by OTHER processes while a benchmark ran: all-CPU busy time minus this process's (and its
    waited-for children's). 0 means the machine was ours alone; 1.0 means another process kept one core busy."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.jiffies0 = _busy_jiffies()
        self.own0 = _own_cpu_seconds()
        self.loadavg0 = load_average()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        j1 = _busy_jiffies()
        own = _own_cpu_seconds() - self.own0
        other = None
        if self.jiffies0 is not None and j1 is not None and wall > 0:
            busy_s = (j1[0] - self.jiffies0[0]) / os.sysconf("SC_CLK_TCK")
            other = round(max(busy_s - own, 0.0) / wall, 2)
        return {"wall_seconds": round(wall, 1), "own_cpu_cores": round(own / wall, 2) if wall > 0 else None,
                "other_processes_cpu_cores": other, "loadavg_start": self.loadavg0, "loadavg_end": load_average()}


def machine() -> dict:
    import onnxruntime

    threads = {k: os.environ.get(k) for k in THREAD_ENV}
    return {"cpu": cpu_info(), "software": software_info(), "onnxruntime_providers": onnxruntime.get_available_providers(),
            "thread_env": {k: v for k, v in threads.items() if v is not None}}


def machine_line(m: dict) -> str:
    cpu = m["cpu"]
    isa = ", ".join(f for f, on in cpu["isa"].items() if on)
    return (f"{cpu['model']}, {cpu['usable_cpus']} usable CPUs ({isa}); onnxruntime {m['software']['onnxruntime']}, "
            f"numpy {m['software']['numpy']}, faiss {m['software'].get('faiss')}, hnswlib {m['software']['hnswlib']}")


def load_line(load: dict) -> str:
    return (f"other processes used {load['other_processes_cpu_cores']} cores on average during the run "
            f"(this run: {load['own_cpu_cores']} cores; loadavg {load['loadavg_start']} -> {load['loadavg_end']}; "
            f"{load['wall_seconds']} s)")


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
                return f"{v:.2e}"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def interleaved_median_ms(fns: list, n: int) -> list[float]:
    """Median ms of each call, the calls taken in turn n times (the same load for all)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(n):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t) * 1000.0) for t in times]


def state_defaults(parser):
    """`parser` with every option's help ending in what it defaults to, where the help does not say so already:
    "(default: X)", "(default: off|on)" for a flag, "(required)" (the rule of every command here: a new user
    reads --help before the README). Call it on the finished parser, before parse_args."""
    import argparse

    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            continue
        text = (action.help or "").replace("%(default)s", str(action.default))
        if action.required:
            extra = "" if "required" in text else "(required)"
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            on = action.default is True
            extra = "" if ("default: off" in text or "default: on" in text) else f"(default: {'on' if on else 'off'})"
        elif re.search(r"\bdefault\b", text, re.I):   # "(default 16)", "default: off", "by default ..."
            extra = ""
        elif action.default is None:
            extra = "(default: none)"
        elif isinstance(action.default, (list, tuple)):
            extra = f"(default: {' '.join(map(str, action.default)) or 'none'})"
        else:
            extra = f"(default: {action.default})"
        if extra:   # the help is an argparse format string (%(default)s, %%): only the added words are escaped
            extra = extra.replace("%", "%%")
            action.help = f"{action.help} {extra}" if action.help else extra
    return parser


def add_results_option(p) -> None:
    """--results-dir: where write_results puts NAME.json / NAME.md (quick trial runs keep the committed ones)."""
    p.add_argument("--results-dir", type=Path, default=RESULTS,
                   help=f"directory for the NAME.json / NAME.md results (default {RESULTS.relative_to(RESULTS.parents[1])})")


def write_results(name: str, title: str, body_md: str, data: dict, load: dict, m: dict | None = None,
                  out_dir: Path | None = None) -> Path:
    """OUT_DIR/NAME.json (everything) and OUT_DIR/NAME.md (the tables), both headed by command, machine and load.

    out_dir defaults to benchmarks/results.
    """
    m = m or machine()
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    cmd = command_line()
    header = (f"# {title}\n\n`{cmd}`\n\n{when}; {machine_line(m)}\n\nLoad: {load_line(load)}\n\n")
    md = header + body_md.rstrip() + "\n"
    (out_dir / f"{name}.md").write_text(md)
    payload = {"command": cmd, "date": when, "machine": m, "load": load, **data}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
    print(md)
    print(f"written: {out_dir / name}.md and .json")
    return out_dir / f"{name}.md"


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


DEFAULT_BUNDLE = Path("/tmp/bench_bundles/bottle10")
BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"


def node_profile(model, x: np.ndarray, threads: int = 2, runs: int = 100) -> list[tuple[str, str, float]]:
    """onnxruntime's per-node profile of `model` (path or bytes) on input `x`: (operator type, node name, mean ms
    per run) in execution order, the first run (memory planning, kernel selection) left out. The profile file goes
    to a temporary folder, not the working directory."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        s = ort.InferenceSession(model if isinstance(model, (bytes, bytearray)) else str(model), opts,
                                 providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: x}
        for _ in range(runs + 1):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = model_runs[0]["ts"] + model_runs[0]["dur"]
    total: dict[str, float] = {}
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
            total[e["name"]] = total.get(e["name"], 0.0) + e["dur"]
            op_of.setdefault(e["name"], e["args"].get("op_name", "?"))
    return [(op_of[n], n[:-len("_kernel_time")], t / runs / 1000.0) for n, t in total.items()]


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '320x224' -> (320, 224): a model input as (W, H)."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h if sep else w))
    except ValueError:
        raise ValueError(f"input size must be N or WxH (e.g. 224 or 320x224), got {text!r}") from None
    if min(size) < 32:
        raise ValueError(f"input size {text!r}: both sides must be at least 32 px")
    return size


def geometry_text(geom) -> str:
    """'input 256x256, 1 tile' or 'input 224x224, 4 tiles on a 384x384 canvas': what replaced '224 px'."""
    (w, h), (cw, ch) = geom.input_size, geom.canvas_size
    text = f"input {w}x{h}, {geom.n_tiles} tile{'s' if geom.n_tiles != 1 else ''}"
    return text + (f" on a {cw}x{ch} canvas" if (cw, ch) != (w, h) or geom.n_tiles != 1 else "")


def ensure_bundle(bundle: Path, data: Path, coreset_ratio: float = 0.1, input_size: tuple[int, int] | None = None,
                  scale: float | None = None, cross_fit_folds: int | None = None) -> Path:
    """Fit the benchmark bundle once if it is not there yet, or if it was written by an older schema.

    input_size None: the exporter's default (aspect kept, about 256 x 256 model pixels); scale: tiling (see
    export.fit.FitSettings); cross_fit_folds None: the exporter's default. Bottle at 10%: a few minutes on 2 cores.
    """
    from edge_runtime.bundle import MANIFEST, SCHEMA_VERSION

    manifest = bundle / MANIFEST
    if manifest.is_file():
        import yaml

        found = (yaml.safe_load(manifest.read_text()) or {}).get("schema_version")
        if found == SCHEMA_VERSION:
            return bundle
        print(f"{manifest}: schema_version {found}, this runtime reads {SCHEMA_VERSION}: fitting it again",
              file=sys.stderr)
    from export.fit import FitSettings, fit

    settings = FitSettings(coreset_ratio=coreset_ratio, input_size=input_size, scale=scale)
    if cross_fit_folds is not None:
        settings.cross_fit_folds = cross_fit_folds
    what = f"{input_size[0]}x{input_size[1]}" if input_size else "default input size"
    print(f"fitting {bundle} from {data} (coreset {coreset_ratio:.0%}, {what}"
          + (f", scale {scale}" if scale is not None else "") + ")", file=sys.stderr)
    fit(data, bundle, settings, overwrite=True)
    return bundle


def patch_features(pipe, images: Path, frames: int) -> tuple[list[Path], list[np.ndarray]]:
    """(image paths, their patch features): `frames` images spread over the folder (searched recursively),
    decoded, preprocessed with the bundle's geometry and run through the pipeline's extractor; what the search
    benchmarks feed every engine alike."""
    from edge_runtime.decode import decode_image
    from edge_runtime.preprocess import preprocess

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    paths = paths[:: max(1, len(paths) // frames)][:frames]
    feats = []
    for p in paths:
        tensor, _, _ = preprocess(decode_image(p.read_bytes(), str(p), pipe.decode_limits), pipe.geometry, str(p))
        feats.append(pipe.extractor(tensor))
    return paths, feats


def bundle_features(bundle_dir: Path, images: Path, frames: int, threads: int):
    """(bundle, its deployed pipeline, image paths, their patch features) for the search benchmarks."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline

    bundle = Bundle.load(bundle_dir)
    pipe = Pipeline(bundle, knn="hnsw", threads=threads)
    paths, feats = patch_features(pipe, images, frames)
    return bundle, pipe, paths, feats
