"""The station file's `lines:` section: several cameras in one daemon, each line with its own source, bundle (or
recipe set), trigger and outputs; everything a line does not set comes from the station's top level.

Cores are shared deliberately: in a multi-line station `inference.threads` is the whole inference budget and each
line gets `inference.threads // len(lines)` onnxruntime intra-op (and HNSW search) threads, at least 1, unless the
line sets `threads:` itself. A station file without `lines:` is one line, exactly as before.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable, Literal

from edge_runtime.capture_queue import CaptureConfig
from edge_runtime.recipes import RecipesConfig, resolve_recipe_paths
from edge_runtime.bundle_policy import FloorScope, source_key
from edge_runtime.outputs import NgImageStoreConfig, OutputConfig, ResultLogConfig
from edge_runtime.sources import FolderSourceConfig, PacedSourceConfig, SourceConfig, VideoSourceConfig
from edge_runtime.sources.video_source import is_stream_url
from edge_runtime.triggers import TriggerConfig

__all__ = ["LineConfig", "line_station_configs", "resolve_line_paths", "validate_lines"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")   # \Z: $ lets a final newline in (probe 113)

# inference.threads (and a line's threads): onnxruntime's intra-op pool and faiss's OpenMP take a C int, and every
# thread beyond the cores only spins (probe 73: threads 2147483648 validated, then every bundle load failed with
# onnxruntime's "incompatible function arguments" and the station stayed in FAULT).
MAX_THREADS = 256
# Lines in one daemon: each loads its bundle (about 70 ms and tens of MiB each) and runs its own threads; a small
# station runs a handful. A station file of 21,000 one-line entries kept `validate` busy for minutes (probe 100).
MAX_LINES = 64


@dataclass(kw_only=True)
class LineConfig:
    name: str                                          # label in logs and metrics (line="..."), state folder name
    source: SourceConfig
    bundle: str | None = None                          # None: the station's bundle
    trigger: TriggerConfig | None = None               # None: the station's trigger
    outputs: list[OutputConfig] | None = None          # None: a result log results-<name>.jsonl
    capture: CaptureConfig | None = None               # None: the station's capture section
    roi: tuple[int, int, int, int] | None = None       # None: the station's roi
    size_policy: Literal["refuse", "resize", "letterbox"] | None = None
    threads: int | None = None                         # None: inference.threads // number of lines (at least 1)
    recipes: RecipesConfig | None = None               # this line's products (edge_runtime/recipes.py)

    def validate(self) -> None:
        if self.bundle is not None and self.recipes is not None:
            raise ValueError("recipes: a line with recipes names its bundles there; leave out 'bundle'")
        if not _NAME.match(self.name):
            raise ValueError(f"name: expected 1-32 letters, digits, '_', '.', '-' (starting with a letter or "
                             f"digit), got {self.name!r}")
        # As the station's roi (config.py): a negative origin or an empty crop would fault every frame, or cut from
        # the far edge (numpy reads a negative index from the end).
        if self.roi is not None and (self.roi[2] <= 0 or self.roi[3] <= 0 or min(self.roi[:2]) < 0):
            raise ValueError(f"roi: expected x, y >= 0 and w, h > 0, got {list(self.roi)}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads: must be 1-{MAX_THREADS} (one per physical core), got {self.threads}")
        if self.bundle is not None and not self.bundle:
            raise ValueError("bundle: must name the bundle directory (leave it out for the station's)")


def gpio_claims(prefix: str, outputs, trigger, recipes) -> list[tuple[str, int, str]]:
    """(chip, offset, where) of every GPIO line these sections claim: output lines, a trigger input, recipe
    select / strobe / ack lines. Line names (a trigger may name its line) are left to libgpiod."""
    from edge_runtime.outputs.gpio_output import GpioConfig

    claims = []
    for j, out in enumerate(outputs or []):
        if isinstance(out, GpioConfig):
            roles = [*out.lines().items(), *([("ack", out.ack)] if out.ack else [])]
            claims += [(out.chip, line.offset, f"{prefix}outputs[{j}].{role}") for role, line in roles]
    if getattr(trigger, "type", None) == "gpio" and isinstance(trigger.line, int):
        claims.append((trigger.chip, trigger.line, f"{prefix}trigger.line"))
    gpio = getattr(recipes, "gpio", None)
    if gpio is not None:
        claims += [(gpio.chip, o, f"{prefix}recipes.gpio.select[{k}]") for k, o in enumerate(gpio.select)]
        claims.append((gpio.chip, gpio.strobe, f"{prefix}recipes.gpio.strobe"))
        if gpio.ack is not None:
            claims.append((gpio.chip, gpio.ack, f"{prefix}recipes.gpio.ack"))
    return claims


def check_gpio_claims(claims: list[tuple[str, int, str]]) -> None:
    """One GPIO line, one role: the same offset as OK in one output and NG in another would drive a pass on the
    fail wire (each output checks only its own lines)."""
    seen: dict[tuple[str, int], str] = {}
    for chip, offset, where in claims:
        # libgpiod takes a chip by path or by name under /dev: one key for both spellings.
        key = (os.path.realpath(chip if chip.startswith("/") else os.path.join("/dev", chip)), offset)
        if key in seen:
            raise ValueError(f"{where}: GPIO line {offset} on {chip} is already used by {seen[key]}")
        seen[key] = where


def check_serial_ports(located: list[tuple[str, object]]) -> None:
    """One serial port, one output: two on one port (two lines, or one line twice) both write RES/RDY/ERR lines to
    the same PLC with their own frame ids, and their receivers split the PLC's TRG and ACK bytes between them (probe
    60: a faulted line's RDY 0 was followed by the other line's RDY 1, and a TRG meant for one line was answered
    'RES 0 OK' by the other). A /dev/serial/by-id link and the device it names are one port."""
    seen: dict[str, str] = {}
    for where, out in located:
        if getattr(out, "type", None) != "serial":
            continue
        key = os.path.realpath(out.port) if out.port.startswith("/") else out.port
        if key in seen:
            raise ValueError(f"{where}.port: serial port {out.port} is already used by {seen[key]}")
        seen[key] = where


def validate_lines(lines: list[LineConfig], trigger=None, recipes=None) -> None:
    """Checks across lines (called from StationConfig.validate): unique names, no file, port or GPIO line used
    twice. `trigger` and `recipes` are the station's, which a line without its own runs with."""
    if len(lines) > MAX_LINES:   # before anything per line (the checks below compare lines pairwise)
        raise ValueError(f"lines: {len(lines)} lines, at most {MAX_LINES} run in one daemon")
    names = [ln.name for ln in lines]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"lines: two lines are named {name!r}")
    logs: list[str] = []
    ports: list[int] = []
    for i, ln in enumerate(lines):
        outputs = ln.outputs or []
        if sum(1 for o in outputs if o.type == "modbus") > 1:
            raise ValueError(f"lines[{i}].outputs: at most one modbus server per line")
        logs += [o.path for o in outputs if isinstance(o, ResultLogConfig)]
        ports += [o.port for o in outputs if o.type == "modbus"]
    for path in logs:
        if logs.count(path) > 1:
            raise ValueError(f"lines: two lines write the same result log {path!r}")
    for port in ports:
        if ports.count(port) > 1:
            raise ValueError(f"lines: two lines serve Modbus on the same port {port}")
    check_serial_ports([(f"lines[{i}].outputs[{j}]", o) for i, ln in enumerate(lines)
                        for j, o in enumerate(ln.outputs or [])])
    claims = []
    for i, ln in enumerate(lines):
        # What the line runs with (line_station_configs): its own trigger and recipes, else the station's.
        own = ln.recipes if ln.recipes is not None else (recipes if ln.bundle is None else None)
        claims += gpio_claims(f"lines[{i}].", ln.outputs, None, None)
        claims += gpio_claims(f"lines[{i}]." if ln.trigger else f"lines[{i}] (the station's) ", None,
                              ln.trigger or trigger, None)
        claims += gpio_claims(f"lines[{i}]." if ln.recipes is not None else f"lines[{i}] (the station's) ", None,
                              None, own)
    check_gpio_claims(claims)


def resolve_line_paths(lines: list[LineConfig], absolute: Callable[[str, str], str]) -> None:
    """Make each line's file paths absolute (config.resolve_paths does the station's)."""
    for i, ln in enumerate(lines):
        key = f"lines[{i}]"
        if ln.bundle:
            ln.bundle = absolute(f"{key}.bundle", ln.bundle)
        resolve_recipe_paths(ln.recipes, key, absolute)
        src = ln.source
        if isinstance(src, FolderSourceConfig):
            src.path = absolute(f"{key}.source.path", src.path)
            if src.journal:
                src.journal = absolute(f"{key}.source.journal", src.journal)
        elif isinstance(src, (VideoSourceConfig, PacedSourceConfig)) and not is_stream_url(src.path):
            src.path = absolute(f"{key}.source.path", src.path)
        if ln.outputs is None:   # the default: a result log of its own, next to the station file
            ln.outputs = [ResultLogConfig(path=absolute(f"{key}.outputs", f"results-{ln.name}.jsonl"))]

        for j, out in enumerate(ln.outputs):
            if isinstance(out, ResultLogConfig):
                out.path = absolute(f"{key}.outputs[{j}].path", out.path)
            elif isinstance(out, NgImageStoreConfig):
                out.dir = absolute(f"{key}.outputs[{j}].dir", out.dir)


def line_station_configs(cfg) -> list[tuple[str | None, object]]:
    """(line name, the StationConfig that line runs) for every line of `cfg`; [(None, cfg)] without `lines:`.

    Each line's config is the station's with the line's own keys applied; its state (frame counter, watch-folder
    journal, highest bundle version) lives in <state_dir>/lines/<name>, so lines never share an id or a file."""
    lines: list[LineConfig] = getattr(cfg, "lines", None) or []
    if not lines:
        # The station's config itself, not a copy: the daemon and the line share it (a rollout moves its bundle).
        cfg.floor_scope = FloorScope(cfg.state_dir, source_key(cfg.source)) if cfg.state_dir else None
        return [(None, cfg)]
    share = max(1, cfg.inference.threads // len(lines))
    out = []
    for ln in lines:
        outputs = ln.outputs
        if outputs is None:   # not resolved against a station file (built in code)
            outputs = [ResultLogConfig(path=f"results-{ln.name}.jsonl")]
        state_dir = os.path.join(cfg.state_dir, "lines", ln.name) if cfg.state_dir else None
        recipes = ln.recipes if ln.recipes is not None else (cfg.recipes if ln.bundle is None else None)
        bundle = recipes.initial_recipe().bundle if recipes is not None else (ln.bundle or cfg.bundle)
        line_cfg = dataclasses.replace(
            cfg, name=f"{cfg.name}/{ln.name}", bundle=bundle, recipes=recipes, source=ln.source,
            trigger=ln.trigger or cfg.trigger, outputs=outputs, capture=ln.capture or cfg.capture,
            roi=ln.roi if ln.roi is not None else cfg.roi, size_policy=ln.size_policy or cfg.size_policy,
            inference=dataclasses.replace(cfg.inference, threads=ln.threads or share),
            # Each line stages its offers in its own folder: a line's commit or rollback prunes every staged copy
            # it does not keep, and in a shared one it deleted the other lines' bundles in service (probe 71: the
            # other line restarted in FAULT, its station-file bundle below its floor).
            # Offers by folder likewise: a line watches <watch_dir>/<line>, as it takes <prefix>/<line>/cmd/rollout.
            # Every line watched the one folder and took every offer (probe 71: a magnetic-tile bundle dropped there
            # was committed on the bottle line too, which then rejected every good bottle with the tile model).
            rollout=dataclasses.replace(
                cfg.rollout, staging_dir=os.path.join(cfg.rollout.staging_dir, ln.name) if cfg.rollout.staging_dir
                else None, watch_dir=os.path.join(cfg.rollout.watch_dir, ln.name) if cfg.rollout.watch_dir else None),
            state_dir=state_dir, lines=[],
            floor_scope=FloorScope(cfg.state_dir, source_key(ln.source),
                                   frozenset(source_key(o.source) for o in lines if o is not ln) - {None})
            if cfg.state_dir else None)
        out.append((ln.name, line_cfg))
    return out

