"""Signed rollout: a bundle offered to the station is staged, verified, switched to, watched, and rolled back.

Offers come from an MQTT command (`<prefix>/cmd/rollout`, payload `{"bundle": "/path/to/bundle"}`) or from a
watched folder (a bundle folder renamed into `rollout.watch_dir`). For each offer, on the rollout thread:

    stage     copy the folder into `staging_dir` (the offered location may change or vanish afterwards)
    verify    the daemon's own load path on the staged copy: checksums, ed25519 signature
              (security.bundle_public_key), product and version admission, golden-image self-test. A failure
              rejects the offer; the station never switches and keeps inspecting with its bundle.
    switch    the verified pipeline is swapped in between two frames (the SIGHUP reload path); the previous
              pipeline stays loaded, its folder and version record are kept for a rollback
    probation the first `probation_parts` parts on the new bundle: `probation_max_faults` FAULTs among them roll
              back at once to the previous pipeline (and its bundle_version record); otherwise it is committed
    restart   rollout.json in state_dir holds the active folder; a daemon that stopped during a probation
              restarts on the previous bundle (the new one may be why it stopped)
    station   rollout.json also holds the station file's bundle as it was at the switch (its path and manifest
              digest): once the station file names another bundle, or that folder holds another one (a new release,
              a switched symlink), the station file's bundle wins at the next start or SIGHUP, logged

Every step is logged (logger edge_runtime.rollout) and reported in the state (MQTT state, /healthz `rollout`).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_runtime.bundle import (MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE, BundleError, read_regular, safe_member,
                                 sha256_file)
from edge_runtime.safe_yaml import load_strict
from edge_runtime.bundle_policy import VERSION_STATE_FILE
from edge_runtime.outputs.base import Output
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger("edge_runtime.rollout")
# Staged copies live apart from <state_dir>/bundles, where the device keeps the versions it makes itself
# (bundle_versions.py): pruning one folder must never reach the other.
STAGING_DIR = "rollout"
MAX_STAGED_BYTES = 4 << 30   # a bundle is tens of MB (a 10% magnetic-tile bank: ~50 MB); far more is not one
_STAGED = re.compile(r"-\d{8}T\d{6}-\d+-\d{1,3}$")

ROLLOUT_STATE_FILE = "rollout.json"
_HISTORY = 20


def listed_files(src: Path) -> tuple[bytes, dict]:
    """An offered folder's raw manifest and the files it lists (its `files` mapping); raises BundleError/OSError."""
    raw = read_regular(src / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    try:
        manifest = load_strict(raw, str(src / MANIFEST))
    except Exception as exc:  # noqa: BLE001 - YAML refused or unreadable: the offer is refused, named
        raise BundleError(f"{src / MANIFEST}: not a readable manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{src / MANIFEST}: 'files' must list every bundle file")
    return raw, files


def stage_listed_files(src: Path, dest: Path) -> None:
    """Copy an offered bundle into `dest`: its manifest, its signature and the files the manifest lists, nothing
    else (the offer is not verified yet: a folder holding a symlink to / or a large file must not make the station
    copy gigabytes). Refuses symlinks, paths outside the folder and offers over MAX_STAGED_BYTES by their declared
    sizes, before copying; each file is copied no further than its declared size, plus one byte for the check
    that follows to see the difference. Raises BundleError or OSError."""
    src = Path(src)
    _, files = listed_files(src)
    sizes = {rel: meta.get("bytes") if isinstance(meta, dict) else None for rel, meta in files.items()}
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in sizes.values()):
        raise BundleError(f"{src / MANIFEST}: every listed file needs its size in bytes")
    total = sum(sizes.values())
    if total > MAX_STAGED_BYTES:
        raise BundleError(f"{src}: the listed files hold {total} bytes, over the {MAX_STAGED_BYTES} byte limit of a "
                          "bundle")
    dest.mkdir(parents=True)
    for rel in (MANIFEST, SIGNATURE, *files):
        path = src / rel if rel in (MANIFEST, SIGNATURE) else safe_member(src, rel)
        if rel == SIGNATURE and not os.path.lexists(path):
            continue
        if os.path.islink(src / rel) or not path.is_file():
            raise BundleError(f"{src}: {rel!r} is a symlink or not a regular file")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        limit = MAX_MANIFEST_BYTES if rel in (MANIFEST, SIGNATURE) else sizes[rel] + 1
        with open(path, "rb") as fin, open(target, "wb") as fout:
            fout.write(fin.read(limit))


def offer_fingerprint(folder: Path, parsed: dict | None = None) -> str:
    """What an offered folder holds, cheaply: the manifest's bytes and the size and modification time of its
    signature and each file it lists (hashed). Files the manifest does not list are never staged: they do not
    count. A manifest that cannot be read yet counts as its bytes (or their absence). `parsed`: a cache of
    manifests already read (by path, size, mtime), so a poll of watch_dir stats files but parses no YAML again."""
    h = hashlib.sha256()
    try:
        st = (folder / MANIFEST).stat()
        key = (str(folder), st.st_size, st.st_mtime_ns, st.st_ino)
        if parsed is not None and key in parsed:
            digest, files = parsed[key]
        else:
            raw, files = listed_files(folder)
            digest = hashlib.sha256(raw).digest()
            if parsed is not None:
                if len(parsed) > 1000:   # old offers' entries: a bound, not a policy
                    parsed.clear()
                parsed[key] = (digest, files)
    except (BundleError, OSError) as exc:
        digest, files = str(exc).encode(), {}
    h.update(digest)
    for rel in sorted([SIGNATURE, *map(str, files)]):
        try:
            st = (folder / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except (OSError, ValueError):
            h.update(f"{rel}\0missing\n".encode())
    return h.hexdigest()[:16]


def station_bundle_record(configured: str | None) -> dict | None:
    """The station file's bundle as it is now: its path and its manifest's sha256 (a symlink followed)."""
    if not configured:
        return None
    try:
        digest = sha256_file(Path(configured) / MANIFEST)
    except OSError:
        digest = None
    return {"path": configured, "manifest_sha256": digest}


def station_file_changed(state: dict, configured: str) -> str | None:
    """Why the station file's bundle is no longer the one the last rollout switched over, or None: the station file
    names another folder, or its folder holds another bundle (a new release unpacked there, a symlink switched).
    An engineer who changed it and restarted (or sent SIGHUP) meant that bundle, not the rolled-out one (probe 76:
    the station ran the rolled-out bundle, logged nothing and `validate` said valid). A state from before this
    record (no `station_bundle`) is taken as unchanged."""
    was = state.get("station_bundle")
    if not state.get("active") or not isinstance(was, dict):
        return None
    if was.get("path") != configured:
        return f"the station file's bundle is {configured}, it was {was.get('path')} at the rollout"
    now = station_bundle_record(configured)["manifest_sha256"]
    if now is not None and now != was.get("manifest_sha256"):
        return f"the station file's bundle {configured} holds another manifest than at the rollout"
    return None


def start_bundle(state: dict, configured: str) -> str:
    """The bundle folder a line starts with, from its rollout state (ROLLOUT_STATE_FILE): the rolled-out one if it
    is there and the station file's bundle has not changed since, else the station file's. (A crash in probation
    is undone by RolloutManager.startup_bundle first.)"""
    active = state.get("active")
    if station_file_changed(state, configured):
        return configured
    return active if active and Path(active).is_dir() else configured


def planned_start_bundle(state_dir: str | None, configured: str) -> str:
    """Read-only, for `validate`: the folder the daemon will start a line with (rollout.enabled)."""
    if not state_dir:
        return configured
    try:
        state = json.loads((Path(state_dir) / ROLLOUT_STATE_FILE).read_text())
    except (OSError, ValueError):
        return configured
    if not isinstance(state, dict):
        return configured
    previous = state.get("previous")
    if state.get("status") == "probation" and not station_file_changed(state, configured):
        # As startup_bundle: never the candidate; with the previous folder gone or none, the station file's (probe
        # 114: validate named and checked the candidate as the bundle the daemon starts on).
        return previous if previous and Path(previous).is_dir() else configured
    return start_bundle(state, configured)


# FAULT answers of parts that never reached the bundle (edge_runtime/line.py words them): a line controller that
# triggers too fast or too late, or a station not ready, must not roll back a good bundle (probe 46); nor a camera
# that gave no frame for a trigger or was lost while it was read (probe 114: three such parts rolled back a good
# candidate, which was then never taken again).
NOT_THE_BUNDLE = ("trigger overrun", "trigger expired", "station not ready", "not inspected: source: ",
                  "not inspected: no frame within ")


@dataclass(kw_only=True)
class RolloutConfig:
    enabled: bool = False
    watch_dir: str | None = None       # bundle folders renamed into here are offered (once per content); None: MQTT only
    staging_dir: str | None = None     # where offered bundles are copied; None: <state_dir>/rollout
    poll_interval_s: float = 2.0       # how often watch_dir is listed
    probation_parts: int = 20          # the first parts on a new bundle that decide whether it stays
    probation_max_faults: int = 3      # this many FAULT results among them roll back to the previous bundle
    # Offers are authenticated by security.bundle_public_key; without one, anyone who can rename a folder into
    # watch_dir or publish cmd/rollout puts any bundle in service (its checksums and id are theirs to recompute).
    allow_unsigned: bool = False

    def validate(self) -> None:
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s: must be > 0, got {self.poll_interval_s}")
        if self.probation_parts < 1:
            raise ValueError(f"probation_parts: must be >= 1, got {self.probation_parts}")
        if not 1 <= self.probation_max_faults <= self.probation_parts:
            raise ValueError(f"probation_max_faults: must be 1..probation_parts ({self.probation_parts}), "
                             f"got {self.probation_max_faults}")

    def resolve_paths(self, absolute: Callable[[str, str], str], where: str, state_dir: str) -> None:
        if self.watch_dir:
            self.watch_dir = absolute(f"{where}.watch_dir", self.watch_dir)
        self.staging_dir = absolute(f"{where}.staging_dir", self.staging_dir) if self.staging_dir else \
            os.path.join(state_dir, STAGING_DIR)


class RolloutError(RuntimeError):
    """An offer that cannot be taken (not a bundle folder, busy, already running)."""


class RolloutManager(Output):
    """The rollout thread plus a sink of records (it watches the parts of a new bundle on probation).

    `load(path, current)` builds and self-tests a pipeline from a bundle folder (raises on any failure);
    `install(pipeline)` hands it to the inspection loop; `current()` returns the pipeline in service.
    """

    name = "rollout"
    role = "record"

    def __init__(self, cfg: RolloutConfig, state_dir: str, *, load: Callable[[str, Any], Any],
                 install: Callable[[Any], None], current: Callable[[], Any],
                 set_bundle_path: Callable[[str], None], withdraw: Callable[[str], None],
                 condemn: Callable[[str, str], None] | None = None) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self._load, self._install, self._current, self._set_bundle_path = load, install, current, set_bundle_path
        self._withdraw = withdraw          # takes the line's bundle out of service: FAULT until a verified one
        self._condemn = condemn or (lambda bundle_id, reason: None)   # no verdict of that bundle goes out
        self._configured: str | None = None   # the station file's bundle (startup_bundle)
        self._offers: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.status = "idle"               # idle | staging | probation | committed | rolled_back | rejected
        self.detail: str | None = None
        self.history: collections.deque[dict] = collections.deque(maxlen=_HISTORY)
        self._previous: Any = None         # the pipeline to roll back to during a probation
        self._previous_path: str | None = None
        self._previous_version_record: bytes | None = None
        self._candidate_id: str | None = None
        self._parts = 0
        self._faults: list[str] = []
        self._state = self._read_state()
        # Offers wait for the line's start-up load: one taken before it would have no previous bundle to roll
        # back to (a restart after a crash in probation had kept the faulty offer in service).
        self._line_loaded = threading.Event()
        self._manifests: dict = {}   # offer_fingerprint's cache of the manifests in watch_dir

    # -- state file ----------------------------------------------------------------------------------------
    def _read_state(self) -> dict:
        try:
            state = json.loads((self.state_dir / ROLLOUT_STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(state, dict):
            # As an unreadable one (and as planned_start_bundle reads it): a `null` or a list had stopped the line's
            # start with an AttributeError, the daemon down while `validate` said valid (probe 114).
            log.error("rollout: %s is not a JSON object (%s); starting without rollout state",
                      self.state_dir / ROLLOUT_STATE_FILE, type(state).__name__)
            return {}
        return state

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / ROLLOUT_STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=1))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def startup_bundle(self, configured: str) -> str:
        """The bundle folder to start with: the rolled-out one, or the previous one after a crash in probation.

        A bundle on probation when the daemon stopped is never started again (it may be why it stopped): the
        previous one if its folder is there, else the station file's, which faults the line if it cannot be
        loaded, never the candidate served as if it had passed."""
        self._configured = configured
        active, previous = self._state.get("active"), self._state.get("previous")
        changed = station_file_changed(self._state, configured)
        if changed:
            self._station_file_wins(changed, "start")
            return configured
        if active and not isinstance(self._state.get("station_bundle"), dict):
            # A state written before the record: what the station file names now is what a change is measured from.
            self._state["station_bundle"] = station_bundle_record(configured)
            self._write_state()
        if active and Path(active).is_dir() and active != configured and self._state.get("status") != "probation":
            log.warning("rollout: starting on the rolled-out bundle %s (%s), not on the station file's bundle %s",
                        active, self.state_dir / ROLLOUT_STATE_FILE, configured)
        if self._state.get("status") == "probation":
            back = previous if previous and Path(previous).is_dir() else configured
            log.error("rollout: the daemon stopped while bundle %s was on probation: starting on %s%s", active,
                      "the previous bundle " if back == previous else "the station file's bundle ", back)
            if back != previous:
                log.error("rollout: the bundle before the probation (%s) is %s", previous,
                          "not there" if previous else "none: the station had no bundle in service")
            self._restore_version_record(self._state.get("previous_version_record"))
            self._state.update(active=previous if back == previous else None, status="rolled_back",
                               rejected=[*self._state.get("rejected", []), self._state.get("candidate_id")][-100:])
            self._write_state()
            self.status, self.detail = "rolled_back", "daemon stopped during probation"
            return back
        return start_bundle(self._state, configured)

    def _station_file_wins(self, why: str, when: str) -> None:
        """The station file's bundle replaces the rolled-out one (its state forgotten, its offers' history kept)."""
        active = self._state.get("active")
        log.warning("rollout: %s: the station file's bundle %s replaces the rolled-out bundle %s (%s)", when,
                    self._configured, active, why)
        if self._state.get("status") == "probation":
            # The candidate saw its probation cut short by the engineer's bundle: the floor of the one before it.
            self._restore_version_record(self._state.get("previous_version_record"))
        self._state.update(active=None, previous=None, status="idle", previous_version_record=None,
                           station_bundle=None)
        self._write_state()
        self._set_status("idle", f"station file's bundle {self._configured} replaced rolled-out {active} ({why})")
        self._record("station_file", self.detail)

    def reload_bundle(self, path: str) -> str:
        """SIGHUP: the folder to reload: the station file's bundle when it changed since the rollout (a symlink
        switched to a new release: the documented deploy), else `path`, the one in service. Not during a rollout:
        its probation decides first."""
        with self._lock:
            busy = self.status in ("staging", "probation")
        changed = self._configured is not None and station_file_changed(self._state, self._configured)
        if not changed:
            return path
        if busy:
            log.warning("rollout: SIGHUP: %s; it is taken at the first SIGHUP after the rollout under way (%s)",
                        changed, self.status)
            return path
        return self._configured

    def reloaded(self, path: str) -> bool:
        """A SIGHUP reload of `path` verified and about to go into service (the line's reload lock held): the
        rollout state follows when it is the station file's bundle replacing the rolled-out one. False: a rollout
        began meanwhile and the reload must not go in."""
        if path != self._configured or not self._state.get("active"):
            return True
        with self._lock:
            if self.status in ("staging", "probation"):
                return False
        changed = station_file_changed(self._state, path)
        if changed:
            self._station_file_wins(changed, "SIGHUP")
        return True

    # -- Output --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self._thread.start()

    def stopping(self) -> None:
        """The line is stopping: no switch from now on (an offer being staged is dropped, offered again later)."""
        with self._lock:
            self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._offers.put(None)
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def publish(self, result: InspectionResult) -> None:
        """Count the parts of a bundle on probation; enough FAULTs queue a rollback (done on the rollout thread)."""
        with self._lock:
            if self.status != "probation" or result.bundle_id != self._candidate_id:
                return
            if result.verdict is Verdict.FAULT and any(cause in (result.error or "") for cause in NOT_THE_BUNDLE):
                return   # the part never reached the bundle: neither a part of its probation nor a fault of it
            self._parts += 1
            if result.verdict is Verdict.FAULT:
                self._faults.append(f"frame {result.frame_id}: {result.error}")
            if len(self._faults) == self.cfg.probation_max_faults:
                # Condemned here, at once: parts keep coming until the rollout thread swaps the bundle back, and a
                # busy rollout thread (a slow watch_dir scan, an fsync) had let 29 more of its verdicts out.
                self._condemn(result.bundle_id, "failed its probation")
                # What tripped it, as of now.
                self._offers.put(("rollback", (list(self._faults), self._parts)))
            elif self._parts == self.cfg.probation_parts and len(self._faults) < self.cfg.probation_max_faults:
                self._offers.put(("commit", None))

    def counters(self) -> dict[str, float]:
        return {"rollouts": self._state.get("rollouts", 0), "rollbacks": self._state.get("rollbacks", 0)}

    # -- offers --------------------------------------------------------------------------------------------
    def offer(self, location: str, origin: str) -> None:
        """Queue a bundle folder for rollout (any thread)."""
        self._offers.put(("offer", (location, origin)))

    def on_command(self, topic: str, payload: bytes) -> None:
        """MQTT `<prefix>/cmd/rollout` with {"bundle": "/path"}: offer it."""
        if topic != "rollout":
            return
        try:
            doc = json.loads(payload)
            location = doc["bundle"]
            if not isinstance(location, str) or not location:
                raise ValueError("'bundle' must be a non-empty string")
        except (ValueError, KeyError, TypeError) as exc:
            self._refuse_beside(f"mqtt command: expected {{\"bundle\": \"/path\"}}, got {payload[:200]!r} ({exc})")
            return
        self.offer(location, "mqtt")

    def report(self) -> dict[str, Any]:
        """For the MQTT state and /healthz."""
        with self._lock:
            doc: dict[str, Any] = {"status": self.status, "detail": self.detail}
            if self.status == "probation":
                doc["probation"] = {"parts": self._parts, "faults": len(self._faults),
                                    "of": self.cfg.probation_parts, "max_faults": self.cfg.probation_max_faults}
            if self.history:
                doc["last"] = self.history[-1]
            return doc

    # -- the rollout thread --------------------------------------------------------------------------------
    def line_loaded(self) -> None:
        """The line's start-up load is over (in service or FAULT): offers may be taken from now on."""
        self._line_loaded.set()

    def _run(self) -> None:
        next_poll = 0.0
        while not self._line_loaded.wait(0.2):
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            if self.cfg.watch_dir and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.cfg.poll_interval_s
                try:
                    self._poll_watch_dir()
                except Exception:  # noqa: BLE001 - a full disk or an unreadable entry: this thread also commits
                    # or rolls back a probation, so it must outlive the watch folder's errors (probe 114's note)
                    log.exception("rollout: watching %s failed; trying again in %g s", self.cfg.watch_dir,
                                  self.cfg.poll_interval_s)
            try:
                item = self._offers.get(timeout=min(self.cfg.poll_interval_s, 1.0))
            except queue.Empty:
                continue
            if item is None:
                return
            kind, arg = item
            try:
                if kind == "offer":
                    self._take_offer(*arg)
                elif kind == "rollback":
                    self._rollback(*arg)
                elif kind == "commit":
                    self._commit()
            except Exception as exc:  # noqa: BLE001 - a rollout failure must never stop the station
                log.exception("rollout: %s failed", kind)
                self._event("rejected", f"{kind}: internal error: {exc}")

    def _poll_watch_dir(self) -> None:
        folder = Path(self.cfg.watch_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)   # a line's own folder (<watch_dir>/<line>) is there to see
        except OSError:
            pass
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                             and not p.name.endswith((".tmp", ".part")))
        except OSError:
            return
        seen = set(self._state.get("seen", []))
        for entry in entries:
            if not (entry / MANIFEST).is_file():
                continue
            # Offered once per content: a folder copied in place (not renamed in whole) can be seen half-written
            # and rejected; once its files change it is offered again. An offer while another rollout runs waits.
            key = f"{entry.name}:{offer_fingerprint(entry, self._manifests)}"
            if key in seen or self.status in ("staging", "probation"):
                continue
            self._state["seen"] = [*self._state.get("seen", []), key][-1000:]
            self._write_state()
            if self._take_offer(str(entry), "watch_dir") == "stopping":
                self._state["seen"] = [k for k in self._state["seen"] if k != key]   # taken again at the next start
                self._write_state()
                return

    def _take_offer(self, location: str, origin: str) -> str | None:
        """Stage, verify and switch to an offered bundle; "stopping" when the station began to stop meanwhile."""
        src = Path(location)
        if self.status in ("staging", "probation"):
            # Refused, and the status left as it is: the rollout under way keeps its probation. A QoS 1 redelivery
            # of the same command had set "rejected" here, which ended the probation unseen: the candidate stayed in
            # service, FAULT on every part, never rolled back, while the plant read "rejected" (probe 70).
            self._refuse_beside(f"{location} ({origin}): another rollout is in progress ({self.status})")
            return
        if not (src / MANIFEST).is_file():
            self._event("rejected", f"{location} ({origin}): not a bundle folder (no {MANIFEST})")
            return
        previous_status = (self.status, self.detail)
        self._set_status("staging", f"{location} ({origin})")
        log.info("rollout: offer %s from %s: staging", location, origin)
        staging = Path(self.cfg.staging_dir)
        staging.mkdir(parents=True, exist_ok=True)
        dest = staging / f"{src.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{int(time.time() * 1000) % 1000}"
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            stage_listed_files(src, tmp)
            os.replace(tmp, dest)
        except (OSError, BundleError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._event("rejected", f"{location}: cannot stage into {staging}: {exc}")
            return
        current = self._current()
        version_record = self._version_record()
        try:
            pipeline = self._load(str(dest), current)
        except Exception as exc:  # noqa: BLE001 - BundleError, OSError ...: the offer is refused, nothing changes
            shutil.rmtree(dest, ignore_errors=True)
            self._event("rejected", f"{location}: verification failed, staying on "
                        f"{current.bundle.bundle_id if current else 'no bundle'}: {exc}")
            return
        new = pipeline.bundle
        if new.bundle_id in self._state.get("rejected", []):
            shutil.rmtree(dest, ignore_errors=True)
            self._restore_version_record(version_record)
            self._event("rejected", f"{location}: bundle {new.bundle_id} was rolled back before; not again")
            return
        if current is not None and new.bundle_id == current.bundle.bundle_id:
            # Offered again (a touched folder, a repeated command): nothing to do, and the last outcome stands.
            shutil.rmtree(dest, ignore_errors=True)
            log.info("rollout: %s: bundle %s is already in service", location, new.bundle_id)
            with self._lock:
                self.status, self.detail = previous_status
            return
        with self._lock:
            stopping = self._stop.is_set()
            if not stopping:
                self._previous, self._previous_version_record = current, version_record
                # Not the previous bundle's own folder when that is a version learned on the station (the page's
                # state_dir/bundles/v...): the station file's bundle, through whose active.json the loader finds
                # that version and checks its lineage. Loaded by its own folder it is a base bundle signed by no
                # workstation key: after a rollback SIGHUP was refused and a restart left the line in FAULT (probe 70).
                self._previous_path = self._state.get("active") or (
                    (self._configured or str(current.bundle.root)) if current else None)
                self._candidate_id, self._parts, self._faults = new.bundle_id, 0, []
                self.status = "probation"
                self.detail = (f"bundle {new.bundle_id} (version {new.bundle_version}) from {location}; previous "
                               f"{current.bundle.bundle_id if current else 'none'}")
        if stopping:
            # The line began to stop while this offer was staged and verified (probe 44: the switch came after
            # SIGTERM, the restart took it for a crash in probation and refused a bundle that never saw a part).
            shutil.rmtree(dest, ignore_errors=True)
            self._restore_version_record(version_record)
            if origin == "watch_dir":   # its key is forgotten: the next start takes it again
                with self._lock:
                    self.status, self.detail = previous_status
                log.warning("rollout: %s: the station is stopping; bundle %s not switched to (offered again at the "
                            "next start)", location, new.bundle_id)
            else:   # an offer sent over MQTT is not kept across a restart: the sender hears it must send it again
                self._event("rejected", f"{location} ({origin}): the station stopped while bundle {new.bundle_id} "
                            "was staged; not switched to: offer it again")
            return "stopping"
        self._state.update(active=str(dest), previous=self._previous_path, status="probation",
                           candidate_id=new.bundle_id, rollouts=self._state.get("rollouts", 0) + 1,
                           # what the station file named at the switch: a later change to it wins (start, SIGHUP)
                           station_bundle=station_bundle_record(self._configured),
                           previous_version_record=version_record.decode() if version_record else None)
        self._write_state()
        self._set_bundle_path(str(dest))
        self._install(pipeline)
        log.warning("rollout: switched to bundle %s (version %s) from %s; probation: %d FAULT in the first %d parts "
                    "roll back to %s", new.bundle_id, new.bundle_version, location, self.cfg.probation_max_faults,
                    self.cfg.probation_parts, current.bundle.bundle_id if current else "none")
        self._record("switched", self.detail)

    def _rollback(self, faults: list[str], parts: int) -> None:
        """Back to the previous bundle; `faults` of the first `parts` parts on probation tripped it."""
        with self._lock:
            if self.status != "probation":
                return
            previous, candidate = self._previous, self._candidate_id
        reason = f"{len(faults)} of the first {parts} parts on bundle {candidate} were FAULT (first: {faults[0]})"
        # At once, before the swap: parts in flight on the candidate, or admitted before the loop swaps it out,
        # get FAULT, not its verdict.
        self._condemn(candidate, "failed its probation")
        if previous is None:
            # Nothing verified to return to (the station had no bundle in service): the candidate goes out of
            # service all the same, the line FAULT until a verified bundle comes, and it is never taken again.
            self._set_bundle_path(self._previous_path or self._configured or "")
            self._withdraw(f"bundle {candidate} failed its probation ({reason}) and there is no previous bundle")
            self._restore_version_record(self._previous_version_record)
            log.error("rollout: bundle %s out of service, no previous bundle to return to: %s", candidate, reason)
            self._prune_staging(keep=set())
            self._state.update(active=self._previous_path, status="rolled_back",
                               rejected=[*self._state.get("rejected", []), candidate][-100:],
                               rollbacks=self._state.get("rollbacks", 0) + 1)
            self._write_state()
            self._event("rolled_back", f"{reason}; no previous bundle to return to: the line is FAULT")
            return
        # The path first: a reload that reads it after the install must find the previous bundle, not the candidate.
        self._set_bundle_path(self._previous_path or str(previous.bundle.root))
        self._install(previous)
        self._restore_version_record(self._previous_version_record)
        log.error("rollout: rolling back to bundle %s (version %s): %s", previous.bundle.bundle_id,
                  previous.bundle.bundle_version, reason)
        self._prune_staging(keep={self._previous_path})
        self._state.update(active=self._previous_path, status="rolled_back",
                           rejected=[*self._state.get("rejected", []), candidate][-100:],
                           rollbacks=self._state.get("rollbacks", 0) + 1)
        self._write_state()
        with self._lock:
            self._previous = None
        self._event("rolled_back", reason)

    def _commit(self) -> None:
        with self._lock:
            if self.status != "probation":
                return
            parts, faults, candidate = self._parts, len(self._faults), self._candidate_id
            self._previous = None   # its memory goes back once the loop dropped it too
        # Keep the committed bundle and the one before it (a manual way back); older staged copies go.
        self._prune_staging(keep={self._state.get("active"), self._state.get("previous")})
        self._state.update(status="committed", previous=None, previous_version_record=None)
        self._write_state()
        log.info("rollout: bundle %s committed after %d parts (%d FAULT)", candidate, parts, faults)
        self._event("committed", f"bundle {candidate}: {parts} parts, {faults} FAULT")

    # -- helpers -------------------------------------------------------------------------------------------
    def _prune_staging(self, keep: set) -> None:
        """Delete staged bundle copies not in `keep`; only inside staging_dir, never the station's own bundle."""
        staging = Path(self.cfg.staging_dir)
        keep_resolved = {str(Path(k).resolve()) for k in keep if k}
        try:
            entries = list(staging.iterdir())
        except OSError:
            return
        for entry in entries:
            # Only copies this manager staged (their names end in -<time>-<pid>-<ms>): a staging_dir set to a
            # folder that holds other bundles (device-made versions, a manual copy) loses nothing else.
            if entry.is_dir() and _STAGED.search(entry.name) and str(entry.resolve()) not in keep_resolved:
                shutil.rmtree(entry, ignore_errors=True)

    def _version_record(self) -> bytes | None:
        try:
            return (self.state_dir / VERSION_STATE_FILE).read_bytes()
        except OSError:
            return None

    def _restore_version_record(self, record: bytes | str | None) -> None:
        """A rollback returns the downgrade floor to the previous bundle's version (our decision, not a downgrade)."""
        path = self.state_dir / VERSION_STATE_FILE
        if record is None:
            path.unlink(missing_ok=True)
            return
        data = record.encode() if isinstance(record, str) else record
        tmp = path.with_suffix(".rollback.tmp")
        tmp.write_bytes(data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _set_status(self, status: str, detail: str | None) -> None:
        with self._lock:
            self.status, self.detail = status, detail

    def _record(self, what: str, detail: str | None) -> None:
        self.history.append({"event": what, "detail": detail, "time": time.time()})

    def _refuse_beside(self, detail: str) -> None:
        """A command or offer refused before it was taken: logged and in the history; the status changes only when no
        rollout is under way (a malformed command during a probation must not end it, like a redelivered one)."""
        with self._lock:
            under_way = self.status in ("staging", "probation")
        if under_way:
            log.error("rollout: offer rejected: %s", detail)
            self._record("rejected", detail)
        else:
            self._event("rejected", detail)

    def _event(self, status: str, detail: str, status_only: bool = False) -> None:
        if status == "rejected":
            log.error("rollout: offer rejected: %s", detail)
        elif not status_only and status not in ("rolled_back", "committed"):
            log.info("rollout: %s: %s", status, detail)
        self._set_status(status, detail)
        self._record(status, detail)
