"""docs/first-station.md works as written: its tested blocks run in order on a synthetic folder of parts, and
every device-only block (root, the real Pi, a camera) has a documented stand-in that runs in its place."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "first-station.md"
BLOCK = re.compile(r"```bash (test|device)\n(.*?)```\n(?:<!-- stand-in: (.*?) -->)?", re.S)


def doc_script(text: str) -> tuple[str, list[str]]:
    """The shell script the page amounts to, and the device blocks that lack a stand-in."""
    steps, missing = [], []
    for kind, body, stand_in in BLOCK.findall(text):
        if kind == "test":
            steps.append(body)
        elif stand_in:
            steps.append(stand_in + "\n")
        else:
            missing.append(body.strip().splitlines()[0])
    return "".join(f"echo '+ step {i}'\n{s}" for i, s in enumerate(steps)), missing


def test_every_fenced_bash_block_is_tested_or_has_a_stand_in():
    text = DOC.read_text()
    script, missing = doc_script(text)
    assert not missing, f"device blocks without a stand-in: {missing}"
    assert text.count("```bash") == len(BLOCK.findall(text)) >= 8      # no untagged block slips past the test
    assert "edge-export fit" in script and "edge-runtime init" in script and "edge-runtime run" in script


def test_the_walk_through_runs_from_photos_to_a_validated_station(tmp_path):
    from export.synthetic_parts import generate_dataset

    data = generate_dataset(tmp_path / "synthetic", n_train=12, n_test_good=0, n_test_defect_per_type=1,
                            size=224, seed=3)
    good, defects = tmp_path / "photos" / "good", tmp_path / "photos" / "defects"
    shutil.copytree(data / "train" / "good", good)           # a plain folder of good parts, as a user has
    for kind in sorted(p for p in (data / "test").iterdir() if p.is_dir() and p.name != "good"):
        shutil.copytree(kind, defects / kind.name)            # a few defects, one subfolder per type
    script, _ = doc_script(DOC.read_text())
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "GOOD": str(good), "DEFECTS": str(defects), "REPO": str(REPO),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    n_good = len(list(good.iterdir()))
    assert f"found {n_good} good images in {good} (flat folder)" in run.stdout
    assert "defect images in 5 types for calibration" in run.stdout
    assert "INT8 target arm (device pi5 from --device)" in run.stdout
    assert "[fp32] cross-fit fold 1:" in log and "[int8] cross-fit fold 1:" in log   # which variant
    assert "trial.yaml: valid" in run.stdout and "station.yaml: valid" in run.stdout
    records = [json.loads(line) for line in (work / "pi" / "results.jsonl").read_text().splitlines()]
    assert len(records) == n_good and {r["verdict"] for r in records} <= {"OK", "NG", "REVIEW"}
    assert (work / "pi" / "station.yaml").read_text().count("# ") > 30   # the commented file the doc promises
    # The run's log has nothing a new user reads as an error: faiss's loader announces a failed AVX2 import at
    # INFO although its wheels dispatch SIMD inside one library.
    assert "Could not load library" not in log and "Traceback" not in log
    service = (work / "pi" / "service.yaml").read_text()   # init --service: writes only where the unit may
    assert "path: /var/log/edge-runtime/results.jsonl" in service


# The commands README.md, systemd/INSTALL.md and this page show: each names a real subcommand and options it has
# (probe 109: a newcomer copies them as written).
COMMAND_DOCS = [REPO / "README.md", REPO / "systemd" / "INSTALL.md", DOC]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
TOOLS = ("edge-runtime", "edge-export", "edge-bench")


def documented_commands(text: str) -> list[tuple[str, list[str]]]:
    commands = []
    inline = [" ".join(span.split()) for span in      # `edge-bench --raw`; `edge-export` alone names the tool
              re.findall(r"`((?:sudo )?edge-(?:runtime|export|bench)\s[^`]*)`", FENCE.sub("", text))]
    for block in FENCE.findall(text) + inline:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)                # a comment, not a word of the command
            for part in re.split(r"&&|;|\$\(", line):
                words = part.split()
                while words and (words[0] == "sudo" or "=" in words[0]):   # sudo, VAR=value before the tool
                    words = words[1:]
                if words[:1] == ["-u"]:                                        # sudo -u USER
                    words = words[2:]
                if words and words[0].split("/")[-1] in TOOLS:
                    commands.append((words[0].split("/")[-1], [w.strip("[]|'\"") for w in words[1:]]))
    return commands


def _parser_tree(main) -> argparse.ArgumentParser:
    made: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    argparse.ArgumentParser.__init__ = spy
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
    finally:
        argparse.ArgumentParser.__init__ = original
    return made[0]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: child for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, child in a.choices.items()}


def test_every_documented_command_names_a_real_subcommand_and_options():
    from edge_runtime import bench, cli as runtime_cli
    from export import cli as export_cli

    parsers = {"edge-runtime": _parser_tree(runtime_cli.main), "edge-export": _parser_tree(export_cli.main),
               "edge-bench": _parser_tree(bench.main)}
    seen, problems = set(), []
    for doc in COMMAND_DOCS:
        for tool, words in documented_commands(doc.read_text()):
            parser, subs = parsers[tool], _subparsers(parsers[tool])
            if subs:
                if not words or words[0] not in subs:
                    problems.append(f"{doc.name}: {tool} {' '.join(words[:1])}: no such subcommand")
                    continue
                parser = subs[words[0]]
                seen.add((doc.name, f"{tool} {words[0]}"))
            options = {o for a in parser._actions for o in a.option_strings}
            for word in words:
                option = word.split("=", 1)[0]
                if option.startswith("--") and option not in options:
                    problems.append(f"{doc.name}: {tool} {' '.join(words[:1])}: no option {option}")
    assert not problems, problems
    # README's "Run a station" shows how the station file it validates and runs is written.
    assert {("README.md", c) for c in ("edge-runtime init", "edge-runtime validate", "edge-runtime run")} <= seen
