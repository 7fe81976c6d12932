"""Every benchmark script's --help states each option's default (or that it is required), as every command here
does (tests/runtime/test_cli_help.py): the benchmarks README sends users to run them. Each script builds its parser
and prints its help in this process (`--help` exits before any work)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if "ArgumentParser(" in p.read_text() and p.name != "bench_report.py")


def _forms(default) -> list[str]:
    """How a help text may write `default`."""
    forms = [str(default)]
    if isinstance(default, float):
        forms.append(f"{default:g}")
    if isinstance(default, (list, tuple)):
        items = [":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in default]
        forms += [" ".join(items), ",".join(items), "x".join(items)]     # --a b c, a,b,c, a W x H size
    if isinstance(default, (str, Path)) and Path(default).is_absolute():
        forms.append(os.path.relpath(default, ROOT))                   # as a user in the checkout types it
    return forms


def _states(text: str, default) -> bool:
    """Whether `text` says 'default X' or 'default: X' with X the whole value: 'default 16' is not a default of 1."""
    return any(re.search(r"\bdefault:? (?:is )?" + re.escape(f) + r"(?!\w|\.\d)", text, re.I) for f in _forms(default))


def _parser(script: Path, monkeypatch) -> argparse.ArgumentParser:
    made: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", spy)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None), f"{script.name} --help exited {done.value.code}"
    assert made, f"{script.name}: no ArgumentParser built by --help"
    return made[0]


def help_problems(parser: argparse.ArgumentParser, name: str) -> list[str]:
    problems = []
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            continue
        opt = "/".join(action.option_strings)
        text = " ".join((action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%").split())
        if not text:
            problems.append(f"{name} {opt}: no help text")
        elif action.required:
            if "required" not in text:
                problems.append(f"{name} {opt}: required, but the help does not say so")
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not re.search(r"\bdefault:? (off|on)\b", text, re.I):
                problems.append(f"{name} {opt}: flag without 'default: off|on'")
        elif action.default is None or action.default in ("", [], ()):   # unset: the help says what that means
            if not re.search(r"\bdefault\b", text, re.I):
                problems.append(f"{name} {opt}: no default stated for an option that defaults to unset")
        elif not _states(text, action.default):
            problems.append(f"{name} {opt}: help does not state its default {action.default!r}: {text[-80:]!r}")
    return problems


def test_every_benchmark_script_is_checked():
    assert len(SCRIPTS) >= 30, [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help_states_every_default(script, monkeypatch):
    assert help_problems(_parser(script, monkeypatch), script.name) == []


def test_the_checker_catches_a_wrong_or_missing_default():
    p = argparse.ArgumentParser()
    p.add_argument("--step", type=int, default=1, help="walk step (default 16)")
    p.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    p.add_argument("--fast", action="store_true", help="run fast")
    p.add_argument("--bundle", required=True, help="the bundle")
    problems = help_problems(p, "x")
    assert [q.split(":")[0] for q in problems] == ["x --step", "x --ratio", "x --fast", "x --bundle"], problems
