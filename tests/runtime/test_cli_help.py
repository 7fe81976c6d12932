"""Every option of every command (edge-runtime, edge-bench, edge-export) has help text that states its default."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

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


def _states(help_text: str, default) -> bool:
    """Whether the help states `default` as a whole value: 'default: 16' does not state a default of 1."""
    return any(re.search(re.escape(t) + r"(?!\w|\.\d)", help_text) for t in _default_text(default))


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
        elif not _states(help_text, action.default):
            problems.append(f"{where} {name}: help does not state its default {action.default!r}")
    return checked, problems


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_that_states_its_default(command, monkeypatch):
    checked, problems = _problems(_capture_parser(COMMANDS[command], monkeypatch), command)
    assert checked > 3 and not problems, "\n".join(problems)


def _parsers(parser: argparse.ArgumentParser, path: str):
    """(command path, parser) for the command and every subcommand, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_subcommand_is_walked(monkeypatch):
    parser = _capture_parser(runtime_cli.main, monkeypatch)
    subs = {where.split()[1] for where, _ in _walk(parser, "edge-runtime") if len(where.split()) > 1}
    assert subs == {"run", "check", "validate", "cameras", "init", "adapt"}
    assert {where for where, _ in _parsers(parser, "edge-runtime")} == {"edge-runtime"} | {
        f"edge-runtime {s}" for s in subs | {"hash-password"}}            # hash-password has no options
    parser = _capture_parser(export_cli.main, monkeypatch)
    subs = {where.split()[1] for where, _ in _walk(parser, "edge-export") if len(where.split()) > 1}
    assert subs == {"fit", "recalibrate", "evaluate", "verify", "keygen", "sign", "demo"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help_says_what_it_does(command, monkeypatch, capsys):
    # `CMD SUB --help` is read before the README: it must say what SUB does, not only show the usage line.
    main = COMMANDS[command]
    walked = list(_parsers(_capture_parser(main, monkeypatch), command))
    assert len(walked) > 1 or command == "edge-bench"
    for where, parser in walked:
        text = " ".join((parser.description or "").split())
        assert 20 <= len(text) <= 600, f"{where}: description missing or not one or two sentences: {text!r}"
        with pytest.raises(SystemExit):
            main([*where.split()[1:], "--help"])
        assert text[:40] in " ".join(capsys.readouterr().out.split()), where


def _all_help_text(monkeypatch) -> str:
    text = []
    for command, main in COMMANDS.items():
        for _, parser in _parsers(_capture_parser(main, monkeypatch), command):
            text += [parser.description or ""] + [a.help or "" for a in parser._actions]
            text += [a.help or "" for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                     for a in a._choices_actions]
    return " ".join(" ".join(text).split())


def test_help_and_docs_cite_no_file_outside_the_repository(monkeypatch):
    # shared/ sits beside the development checkout, not in the repository a user has.
    assert "shared/" not in _all_help_text(monkeypatch)
    repo = Path(__file__).resolve().parents[2]
    docs = [repo / "README.md", repo / "benchmarks" / "README.md", *sorted((repo / "docs").rglob("*.md")),
            *sorted((repo / "device_configs").glob("*.yaml"))]
    cited = [f"{p.relative_to(repo)}: {n}" for p in docs for n in ("shared/BACKBONES", "shared/SEARCH")
             if n in p.read_text()]
    assert not cited, cited


def test_max_train_help_says_how_the_images_are_chosen(capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "random choice seeded by --seed" in out and "(default: no limit, all of them)" in out


def test_init_help_names_the_source_and_output_types_it_cannot_write(capsys):
    # Every type the station file accepts is either one init writes or one its help sends to the README.
    from edge_runtime.outputs import OUTPUTS
    from edge_runtime.sources import SOURCES
    from edge_runtime.station_init import OUTPUT_KINDS, SOURCE_KINDS

    with pytest.raises(SystemExit):
        runtime_cli.main(["init", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    out = out[out.index("options:"):]                                   # past the usage line
    source_help = out[out.index("--source SOURCE"):out.index("--output {")]
    output_help = out[out.index("--output {"):out.index("--device {")]
    def shipped(registry) -> set[str]:     # not the doubles tests/doubles registers
        return {k for c in registry.configs() if c.__module__.startswith("edge_runtime.") for k in registry._type_keys(c)}

    sources, outputs = shipped(SOURCES), shipped(OUTPUTS)
    assert set(SOURCE_KINDS) <= sources and set(OUTPUT_KINDS) <= outputs
    for kind in sorted(sources):
        assert kind in source_help, f"--source help does not name source type {kind!r}"
    for kind in sorted(outputs - set(OUTPUT_KINDS)):
        assert kind in output_help.split("(default:")[1], f"--output help does not say init cannot write {kind!r}"
    assert "README" in source_help and "README" in output_help


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
        s.add_argument("--step", type=int, default=1, help="walk step (default: 16)")       # probe 107: a prefix
        s.add_argument("--ratio", type=float, default=0.1, help="share (default: 0.15)")
        p.parse_args(argv)

    checked, problems = _problems(_capture_parser(bad_main, monkeypatch), "bad")
    assert checked == 7 and [x.split(":")[0] for x in problems] == [
        "bad go --knn", "bad go --fast", "bad go --out", "bad go --ef", "bad go --step", "bad go --ratio"], problems


def test_fit_help_documents_the_device_to_int8_mapping(capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "pi5->arm" in out and "x86->x86-avx2" in out and "jetson-orin->arm" in out


def test_hash_password_refuses_bytes_that_are_not_utf8(monkeypatch, capsys):
    """Probe 100: `printf '\\xff\\xfe\\n' | edge-runtime hash-password` died with a UnicodeEncodeError traceback
    (stdin reads undecodable bytes as surrogates); no browser can send such a password."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\n"), errors="surrogateescape"))
    assert runtime_cli.main(["hash-password"]) == 2
    assert "edge-runtime hash-password: the password is not UTF-8 text" in capsys.readouterr().err
