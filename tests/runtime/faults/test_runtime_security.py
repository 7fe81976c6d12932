"""Security properties of the device runtime: no torch, no unpickling, no unsafe YAML, anywhere in edge_runtime."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import edge_runtime
from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame, Verdict

PACKAGE = Path(edge_runtime.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_importing_every_runtime_module_imports_neither_torch_nor_the_exporter():
    # A fresh interpreter: in this one, conftest's fixtures have long since imported torch.
    script = """
import importlib, json, pkgutil, sys
import edge_runtime
names = [m.name for m in pkgutil.walk_packages(edge_runtime.__path__, "edge_runtime.")]
absent = []
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:   # a module of an optional extra on an install without it
        if exc.name.split(".")[0] not in OPTIONAL:
            raise
        absent.append(name)
print(json.dumps({"modules": names, "absent": absent, "loaded": sorted(m for m in sys.modules
      if m.split(".")[0] in ("torch", "torchvision", "export", "onnx", "pickle5", "dill", "joblib"))}))
"""
    # The optional extras' packages: a device install may lack them, and the modules that need them are then
    # left out (never the pipeline's, which the assertion below requires).
    optional = ["starlette", "uvicorn", "asyncua", "paho", "serial", "pymodbus", "gpiod", "cryptography", "hnswlib"]
    script = f"OPTIONAL = {optional!r}\n" + script
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "edge_runtime.daemon" in report["modules"] and "edge_runtime.bundle" in report["modules"]
    core = {"edge_runtime.daemon", "edge_runtime.pipeline", "edge_runtime.bundle", "edge_runtime.nn_search",
            "edge_runtime.features", "edge_runtime.preprocess", "edge_runtime.scoring", "edge_runtime.cli"}
    assert not core & set(report["absent"]), report["absent"]
    assert report["loaded"] == []


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            dotted = []
            while isinstance(func, ast.Attribute):
                dotted.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                dotted.append(func.id)
            yield ".".join(reversed(dotted)), node


def test_no_runtime_source_deserialises_code():
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve", "torch"):
                        problems.append(f"{path.name}:{node.lineno}: imports {name}")
        for name, call in _calls(tree):
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "eval", "exec"):
                problems.append(f"{path.name}:{call.lineno}: calls {name}")
            if name in ("np.load", "numpy.load"):
                safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in call.keywords)
                if not safe:
                    problems.append(f"{path.name}:{call.lineno}: np.load without allow_pickle=False")
    assert problems == []


def test_loading_and_inspecting_never_unpickles(small_bundle, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("the runtime tried to unpickle something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    bundle = Bundle.load(small_bundle)
    pipeline = Pipeline(bundle, threads=1)
    golden = bundle.path(bundle.variant().golden[0]["file"]).read_bytes()
    assert pipeline.inspect(Frame(frame_id=1, source="golden", encoded=golden)).verdict is Verdict.OK
