"""Every option of every command (edge-runtime, edge-bench, edge-export) has help text that states its default."""
from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from edge_runtime import bench as bench_mod
from edge_runtime import cli as runtime_cli
from export import cli as export_cli


def _capture_parser(main, monkeypatch) -> argparse.ArgumentParser:
    """Build the command's real parser by running main(['--help']) and keeping the parser it made."""
    made: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", spy)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        main(["--help"])
    return made[0]


def _walk(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def _default_text(default) -> list[str]:
    if isinstance(default, float):
        return [f"default: {default}", f"default: {default:g}"]
    return [f"default: {default}"]


COMMANDS = {"edge-runtime": runtime_cli.main, "edge-bench": bench_mod.main, "edge-export": export_cli.main}


def _problems(parser: argparse.ArgumentParser, command: str) -> tuple[int, list[str]]:
    checked, problems = 0, []
    for where, action in _walk(parser, command):
        name = "/".join(action.option_strings) or action.dest
        help_text = " ".join((action.help or "").split())
        checked += 1
        if not help_text:
            problems.append(f"{where} {name}: no help text")
            continue
        if not action.option_strings:
            continue                       # positionals have no default
        if action.required:
            if "required" not in help_text:
                problems.append(f"{where} {name}: required, but the help does not say so")
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if "default: off" not in help_text and "default: on" not in help_text:
                problems.append(f"{where} {name}: flag without 'default: off|on'")
        elif action.default is None:
            if "default: " not in help_text:
                problems.append(f"{where} {name}: no 'default: ...' for an option that defaults to unset")
        elif not any(t in help_text for t in _default_text(action.default)):
            problems.append(f"{where} {name}: help does not state its default {action.default!r}")
    return checked, problems


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_that_states_its_default(command, monkeypatch):
    checked, problems = _problems(_capture_parser(COMMANDS[command], monkeypatch), command)
    assert checked > 3 and not problems, "\n".join(problems)


def test_every_subcommand_is_walked(monkeypatch):
    parser = _capture_parser(runtime_cli.main, monkeypatch)
    subs = {where.split()[1] for where, _ in _walk(parser, "edge-runtime") if len(where.split()) > 1}
    assert subs == {"run", "check", "validate", "cameras", "init", "adapt"}
    parser = _capture_parser(export_cli.main, monkeypatch)
    subs = {where.split()[1] for where, _ in _walk(parser, "edge-export") if len(where.split()) > 1}
    assert subs == {"fit", "recalibrate", "evaluate", "verify", "keygen", "sign", "demo"}


def test_the_helper_catches_a_missing_default(monkeypatch):
    # The walker itself must fail on an undocumented default, or the test above proves nothing.
    def bad_main(argv):
        p = argparse.ArgumentParser(prog="bad")
        sub = p.add_subparsers()
        s = sub.add_parser("go")
        s.add_argument("--knn", default="hnsw", help="nearest-neighbour search")
        s.add_argument("--gap", type=float, default=0.0, help="gap (default: 0)")
        s.add_argument("--fast", action="store_true", help="go fast")
        s.add_argument("--out", required=True, help="where")
        s.add_argument("--ef", type=int)
        p.parse_args(argv)

    checked, problems = _problems(_capture_parser(bad_main, monkeypatch), "bad")
    assert checked == 5 and [x.split(":")[0] for x in problems] == [
        "bad go --knn", "bad go --fast", "bad go --out", "bad go --ef"], problems


def test_fit_help_documents_the_device_to_int8_mapping(capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pi5->arm" in out and "x86->x86-avx2" in out and "jetson-orin->arm" in out
