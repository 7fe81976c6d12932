"""Feedback on a line with recipes: every change goes to the active recipe's own bundle versions, never another's.

Each recipe keeps its versions, `active.json`, audit log and stored defects in state_dir/recipes/<recipe> (where
its version floor already lives, and where the loader looks for its active version), so a version learned on one
product never follows the line to another.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from edge_runtime.bundle import Bundle
from edge_runtime.bundle_versions import VersionStore
from edge_runtime.operator_page.feedback import Feedback, FeedbackError
from edge_runtime.operator_page.part_history import PartHistory

RELOAD_TIMEOUT_S = 180.0


class RecipeFeedback:
    """The Feedback interface for a line with recipes, served by the active recipe's own Feedback.

    Changes are refused while a switch runs or after one failed; a part is learned or stored only into the recipe
    it was inspected with (its bundle id is one of that recipe's versions). Applying reloads the recipe through
    the line's own switch path (verified, self-tested; the line is in FAULT for the few ms of the swap, as in any
    switch, and parts arriving meanwhile are FAULT, never inspected with the wrong bundle)."""

    def __init__(self, line, history: PartHistory, signing_key: str | None):
        self.line, self.history, self.signing_key = line, history, signing_key
        self._by_recipe: dict[str, Feedback] = {}
        self._lock = threading.Lock()

    # ---- the active recipe's Feedback ----------------------------------------------------------------------------
    def _feedback(self, changing: bool = True) -> Feedback:
        switcher = self.line.recipes
        if changing and switcher.status != "ok":
            raise FeedbackError(f"recipe {switcher.active.name}: a recipe switch is {switcher.status}; "
                                "nothing is changed until the line runs a recipe again")
        recipe = switcher.active
        with self._lock:
            fb = self._by_recipe.get(recipe.name)
            if fb is None:
                cfg = switcher.recipe_cfg(recipe)
                if not cfg.state_dir:
                    raise FeedbackError("feedback needs a state_dir for the bundle versions")
                fb = Feedback(VersionStore(cfg.bundle, cfg.state_dir, self.signing_key), self.history,
                              self._current_bundle, self._reloader(recipe.name), threads=1)
                self._by_recipe[recipe.name] = fb
        return fb

    def _current_bundle(self) -> Bundle | None:
        p = self.line.pipeline
        return p.bundle if p is not None else None

    def _reloader(self, recipe: str):
        def reload(bundle_id: str) -> None:
            """The active recipe again from disk (SIGHUP's path), until `bundle_id` is in service."""
            switcher = self.line.recipes
            failures = switcher.switch_failures
            self.line.request_reload()
            deadline = time.monotonic() + RELOAD_TIMEOUT_S
            while time.monotonic() < deadline:
                p = self.line.pipeline
                if switcher.status == "ok" and p is not None and p.bundle.bundle_id == bundle_id:
                    return
                if switcher.switch_failures > failures:
                    raise RuntimeError("the line refused the new version (see its log)")
                if switcher.active.name != recipe or (switcher.switching_to and switcher.switching_to.name != recipe):
                    raise RuntimeError(f"the line switched away from recipe {recipe}")
                time.sleep(0.05)
            raise RuntimeError(f"the new version was not in service within {RELOAD_TIMEOUT_S:.0f} s")
        return reload

    def _restore(self, fb: Feedback, work, *args) -> dict:
        """`work(*args)`; when the new version was refused, reload the recipe's previous one (the pointer is back):
        a failed switch would otherwise keep the line in FAULT."""
        try:
            return work(*args)
        except FeedbackError:
            if self.line.recipes.status == "failed":
                self.line.request_reload()
            raise

    def _own_part(self, fb: Feedback, frame_id: int) -> None:
        part = self.history.get(frame_id)
        if part is None:
            return   # Feedback names the problem
        ids = {v.get("bundle_id") for v in fb.versions()}
        if part.record.get("bundle_id") not in ids:
            raise FeedbackError(f"part {frame_id} was inspected with bundle {part.record.get('bundle_id')}, not one of "
                                f"recipe {self.line.recipes.active.name}'s versions: learn a part under its own recipe")

    # ---- Feedback's interface ----------------------------------------------------------------------------------
    def preview_good(self, frame_id: int, who: str, needs: str = "engineer", operator_max: float = 0.0) -> dict:
        fb = self._feedback()
        self._own_part(fb, frame_id)
        return fb.preview_good(frame_id, who, needs, operator_max)

    def apply(self, plan_id: str, who: str, action: str, role: str) -> dict:
        fb = self._feedback()
        return self._restore(fb, fb.apply, plan_id, who, action, role)

    def mark_bad(self, frame_id: int, who: str) -> dict:
        fb = self._feedback()
        self._own_part(fb, frame_id)
        return fb.mark_bad(frame_id, who)

    def pending_defects(self) -> list:
        return self._feedback(changing=False).pending_defects()

    def preview_recalibrate(self, who: str) -> dict:
        return self._feedback().preview_recalibrate(who)

    def apply_recalibrate(self, plan_id: str, who: str, role: str) -> dict:
        fb = self._feedback()
        return self._restore(fb, fb.apply_recalibrate, plan_id, who, role)

    def versions(self) -> list[dict]:
        return self._feedback(changing=False).versions()

    def rollback(self, name: str, who: str) -> dict:
        fb = self._feedback()
        return self._restore(fb, fb.rollback, name, who)

    def audit(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._feedback(changing=False).audit(limit)

    @property
    def recipe(self) -> str:
        return self.line.recipes.active.name
