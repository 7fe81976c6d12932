"""Feedback from the line, on the station: learn a false reject, store an escape, recalibrate, roll back.

Every change becomes a bundle version (edge_runtime.bank_adapt) in the station's VersionStore, is made active and
loaded through the daemon's own reload path (verification, self-test, atomic swap), and is written to the audit
log. Changes are prepared first (`preview_*`) so the person sees their effect before anything is applied.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edge_runtime.bank_adapt import AdaptError, Adaptation, InputImage, prepare, read_audit
from edge_runtime.bundle import Bundle
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.operator_page.auth import role_allows
from edge_runtime.operator_page.part_history import PartHistory

PLAN_TTL_S = 600.0
PLANS_KEPT = 4   # previews kept per line, newest first: a person applies the one they just saw
PENDING_DEFECTS = "feedback_defects"
# Escapes stored for the next recalibration: an operator's "this part was bad" wrote a PNG a click with no bound
# (probe 104's note), and a recalibration reads every one of them into memory.
PENDING_DEFECTS_MAX = 200


class FeedbackError(RuntimeError):
    """The request cannot be served; the message is shown to the person."""


def check_learnable(history: PartHistory, frame_id: int, role: str, operator_max: float) -> str:
    """The role a preview of teaching part `frame_id` as good needs to be applied ("operator" or "engineer"), when
    `role` may preview it; else FeedbackError with the reason.

    Only a part the station rejected or sent to review has anything to teach. A false reject scores near the
    threshold; a part far above it is more likely a defect, and teaching it would hide that defect and others like
    it (a probe taught parts at twice the threshold and an untaught defect then passed), so an operator may teach
    parts up to `operator_max` times the threshold (page.operator_learn_max) and an engineer confirms the rest."""
    part = history.get(frame_id)
    if part is None:
        raise FeedbackError(f"part {frame_id} is no longer in the history")
    verdict, score, threshold = part.record.get("verdict"), part.record.get("score"), part.record.get("threshold")
    if verdict not in ("NG", "REVIEW") or score is None or not threshold:
        raise FeedbackError(f"part {frame_id} was {verdict}: only a rejected (NG) or REVIEW part can be taught as good")
    ratio = float(score) / float(threshold)
    needs = "operator" if ratio <= operator_max else "engineer"
    if not role_allows(role, needs):
        raise FeedbackError(f"part {frame_id} scored {float(score):.2f}, {ratio:.2f} x the threshold "
                            f"{float(threshold):.2f}; an operator may teach parts up to {operator_max:g} x "
                            "(page.operator_learn_max): an engineer must confirm that this one is good")
    return needs


class Feedback:
    """`current_bundle()` returns the bundle in service; `reload()` asks the daemon to load the active version and
    returns once it is in service (or raises)."""

    def __init__(self, store: VersionStore, history: PartHistory, current_bundle: Callable[[], Bundle | None],
                 reload: Callable[[str], None], threads: int = 1, held: Callable[[], str | None] = lambda: None):
        self.store = store
        self.held = held     # why no version may go into service now (a rollout on probation), or None
        self.history = history
        self.current_bundle = current_bundle
        self.reload = reload
        self.threads = threads
        self._plans: dict[str, tuple[float, str, Adaptation, list[int]]] = {}
        self._lock = threading.Lock()   # one change at a time
        self._preview = threading.Lock()   # one preview at a time (see _prepare)
        self.pending_dir = store.state_dir / PENDING_DEFECTS

    # ---- helpers -------------------------------------------------------------------------------------------
    def _bundle(self) -> Bundle:
        b = self.current_bundle()
        if b is None:
            raise FeedbackError("no bundle is in service")
        return Bundle.load(b.root)

    def _check_not_held(self) -> None:
        why = self.held()
        if why:
            raise FeedbackError(why)

    def _frame_image(self, frame_id: int) -> InputImage:
        part = self.history.get(frame_id)
        if part is None:
            raise FeedbackError(f"part {frame_id} is no longer in the history")
        if part.frame is None:
            raise FeedbackError(f"the frame of part {frame_id} is no longer kept (page.keep_frames)")
        current = self.current_bundle()
        if current is not None and current.geometry.roi is not None:
            # The page keeps the inspected region, already cropped; the bundle's own ROI would crop it again.
            raise FeedbackError("this bundle crops its own ROI: give the full camera frame to `edge-runtime adapt`")
        return InputImage.from_rgb(f"frame{frame_id}_{Path(part.record.get('source') or '').name}", part.frame)

    def _prepare(self, learn: list[InputImage], defects: list[InputImage]) -> Adaptation:
        """prepare() on the bundle in service, one at a time per line, the plan without the bundle's file bytes.

        Each preview runs the extractor on one thread, but the page served them in parallel and kept each plan's
        bundle with every verified file (36 MB for bottle) for PLAN_TTL_S (probe 104: an operator's 6 concurrent
        previews took inspection p50 from 10 to 68 ms and the daemon from 213 to 917 MB in 2 s). write() reads
        and checks the released files again against the manifest."""
        if not self._preview.acquire(blocking=False):
            raise FeedbackError("another preview is being computed on this line; try again in a moment")
        try:
            bundle = self._bundle()
            try:
                plan = prepare(bundle, learn, defects, threads=self.threads)
            except AdaptError as exc:
                raise FeedbackError(str(exc)) from None
            bundle.release()
            return plan
        finally:
            self._preview.release()

    def _keep(self, who: str, plan: Adaptation, frames: list[int], action: str, needs: str) -> str:
        """A preview kept for `PLAN_TTL_S`, to be applied once, as `action`, by a person whose role `needs` allows."""
        now = time.monotonic()   # not the wall clock: a step back (NTP) would keep a preview for as long as the step
        with self._lock:
            for k in [k for k, v in self._plans.items() if now - v[0] > PLAN_TTL_S]:
                del self._plans[k]
            while len(self._plans) >= PLANS_KEPT:   # each holds its images: the oldest goes (preview it again)
                del self._plans[next(iter(self._plans))]
            pid = secrets.token_urlsafe(12)
            self._plans[pid] = (now, who, plan, frames, action, needs)
        return pid

    def _apply(self, plan_id: str, who: str, action: str, role: str) -> dict:
        with self._lock:
            entry = self._plans.get(plan_id)
            if entry is not None and time.monotonic() - entry[0] > PLAN_TTL_S:
                # Expired, even when no later preview has purged it yet: the part history moved on since.
                del self._plans[plan_id]
                entry = None
            if entry is None:
                raise FeedbackError("this preview has expired or was applied already; preview again")
            # The plan says what it is and who may apply it: an operator had applied an engineer's preview of a
            # part far above the threshold, and a Recalibrate plan through the learn endpoint.
            _, _, plan, frames, kind, needs = entry
            if kind != action:
                raise FeedbackError(f"this preview is a {kind}, not a {action}")
            if not role_allows(role, needs):
                raise FeedbackError(f"this preview needs the {needs} role to be applied; {who} is {role}")
            del self._plans[plan_id]
            self._check_not_held()
            current = self.current_bundle()
            if current is None or current.bundle_id != plan.parent.bundle_id:
                raise FeedbackError("the bundle in service changed since the preview; preview again")
            folder = self.store.new_folder()
            try:
                new = plan.write(folder, who=who, signing_key=self.store.signing_key, audit_log=self.store.audit_log,
                                 action=action)
            except AdaptError as exc:
                raise FeedbackError(str(exc)) from None
            previous = self.store.active_dir()
            self.store.activate(folder)
            try:
                self.reload(new.bundle_id)
            except Exception as exc:
                self.store.activate(None if previous == self.store.base else previous)
                raise FeedbackError(f"the new version was not taken into service ({exc}); kept the previous one") from None
        for f in frames:
            self.history.mark(f, f"{action} by {who}: version {new.bundle_version}")
        return {"bundle_id": new.bundle_id, "bundle_version": new.bundle_version, "folder": folder.name}

    # ---- this NG part is good ----------------------------------------------------------------------------------
    def preview_good(self, frame_id: int, who: str, needs: str = "engineer", operator_max: float = 0.0) -> dict:
        """`needs`: the role that may apply it (check_learnable, on the part's record); `operator_max`:
        page.operator_learn_max, checked again against the bundle the plan changes."""
        img = self._frame_image(frame_id)
        plan = self._prepare([img], [])
        # check_learnable read the part's record, i.e. the threshold of the bundle that inspected it; the plan changes
        # the bundle in service, which may be another one since (a reload, a rollout, a version learned meanwhile).
        # An operator teaches the part only if it lies within operator_max of that bundle's threshold too (probe 74:
        # a contamination at 1.05 x the old bundle's threshold, 1.52 x the one in service, was taught by an operator).
        if needs == "operator" and plan.above_learn_limit(operator_max):
            needs = "engineer"
        return {"plan": self._keep(who, plan, [frame_id], "learn-good", needs), "needs": needs, **plan.summary()}

    def apply(self, plan_id: str, who: str, action: str, role: str) -> dict:
        return self._apply(plan_id, who, action, role)

    # ---- this OK part was bad ------------------------------------------------------------------------------------
    def mark_bad(self, frame_id: int, who: str) -> dict:
        img = self._frame_image(frame_id)
        pending = self.pending_defects()
        stored = [p for p in pending if p.name.endswith(f"_{int(frame_id)}.png")]
        if stored:   # once per part: a second click stores no second copy of the same frame
            return {"stored": stored[0].name, "pending": len(pending)}
        if len(pending) >= PENDING_DEFECTS_MAX:
            raise FeedbackError(f"{len(pending)} escaped parts are stored already (at most {PENDING_DEFECTS_MAX}): "
                                "an engineer recalibrates with them first")
        path = self.pending_dir / f"{int(time.time())}_{frame_id}.png"
        tmp = self.pending_dir / f".{path.name}.part"   # not *.png: never read as a stored defect
        try:
            # Whole or not at all (probe 113: a write cut short by a full disk left a torn PNG under the final
            # name; the next click answered 'stored' and every recalibration failed on it until it was deleted).
            self.pending_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(img.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise FeedbackError(f"part {frame_id} not stored: {exc.strerror or exc}") from None
        self.history.mark(frame_id, f"marked bad by {who}")
        from edge_runtime.bank_adapt import append_audit

        append_audit(self.store.audit_log, {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "who": who,
                                            "action": "mark-defect", "frame_id": frame_id, "file": str(path)})
        return {"stored": path.name, "pending": len(self.pending_defects())}

    def pending_defects(self) -> list[Path]:
        return sorted(self.pending_dir.glob("*.png")) if self.pending_dir.is_dir() else []

    def preview_recalibrate(self, who: str) -> dict:
        defects = [InputImage.from_file(p) for p in self.pending_defects()]
        if not defects:
            raise FeedbackError("no stored defects to recalibrate with: mark an escaped part as bad first")
        plan = self._prepare([], defects)
        # The bank does not change, so the recent parts keep their scores: only the threshold moves.
        ch = next(iter(plan.changes.values()))
        recent = [r for r in self.history.records() if r.get("score") is not None]
        changed = [{"frame_id": r["frame_id"], "score": r["score"], "verdict": r["verdict"],
                    "verdict_after": "NG" if r["score"] >= ch.threshold_after else r["verdict"]} for r in recent]
        summary = plan.summary()
        summary["recent"] = {"parts": len(recent),
                             "newly_rejected": [c for c in changed if c["verdict_after"] != c["verdict"]]}
        return {"plan": self._keep(who, plan, [], "recalibrate", "engineer"), **summary}

    def apply_recalibrate(self, plan_id: str, who: str, role: str) -> dict:
        out = self._apply(plan_id, who, "recalibrate", role)
        for p in self.pending_defects():
            p.unlink()
        return out

    # ---- versions --------------------------------------------------------------------------------------------------
    def versions(self) -> list[dict]:
        return self.store.versions()

    def rollback(self, name: str, who: str) -> dict:
        with self._lock:
            self._check_not_held()
            try:
                folder = self.store.rollback(name, self.current_bundle(), who)
            except AdaptError as exc:
                raise FeedbackError(str(exc)) from None
            previous = self.store.active_dir()
            self.store.activate(folder)
            new = Bundle.load(folder, verify=False)
            try:
                self.reload(new.bundle_id)
            except Exception as exc:
                self.store.activate(None if previous == self.store.base else previous)
                raise FeedbackError(f"the rolled-back version was not taken into service ({exc})") from None
        return {"bundle_id": new.bundle_id, "bundle_version": new.bundle_version, "folder": folder.name}

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(reversed(read_audit(self.store.audit_log, limit)))
