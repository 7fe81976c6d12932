"""The station file as hostile input: any YAML text or structure yields a StationConfig or a ConfigError, nothing else.

An exception of another type would crash the daemon at start-up with a traceback instead of a message naming
the file and key; the fuzzer builds structures from the schema's own keys and tags so it reaches deep fields.
"""
from __future__ import annotations

import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.config import StationConfig, load_station
from edge_runtime.schema import ConfigError, from_mapping


def _schema_vocabulary() -> tuple[list[str], list[str]]:
    """Every field name and every `type` tag reachable from StationConfig."""
    keys: set[str] = set()
    tags: set[str] = set()
    seen: set[type] = set()

    def visit(tp) -> None:
        for arg in typing.get_args(tp):
            visit(arg)
        if typing.get_origin(tp) is typing.Literal:
            tags.update(a for a in typing.get_args(tp) if isinstance(a, str))
        if dataclasses.is_dataclass(tp) and tp not in seen:
            seen.add(tp)
            for name, hint in typing.get_type_hints(tp).items():
                keys.add(name)
                visit(hint)

    visit(StationConfig)
    return sorted(keys), sorted(tags)


KEYS, TAGS = _schema_vocabulary()
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(TAGS), st.text(max_size=12),
    st.sampled_from(["", ".", "/dev/null", "~nobody_such_user/x", "a\x00b", "/tmp/fuzz.jsonl", "0.0.0.0", "-1"]),
    st.sampled_from([10**400, -(2**64), 2**63]),   # YAML ints are unbounded; float() of the first overflows
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(), st.text(max_size=4)),
                                            inner, max_size=5)),
    max_leaves=20)
# Start from a valid station, then let the fuzzer replace or add keys at the top and one level down.
BASE = {"bundle": "bundle", "source": {"type": "folder", "path": "frames"},
        "outputs": [{"type": "result_log", "path": "results.jsonl"}]}


@st.composite
def stations(draw):
    data = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(KEYS))
        target = draw(st.sampled_from(["top", "source", "output"]))
        if target == "source" and isinstance(data.get("source"), dict):
            data["source"][key] = draw(VALUES)
        elif target == "output" and isinstance(data.get("outputs"), list) and data["outputs"] \
                and isinstance(data["outputs"][0], dict):
            data["outputs"][0] = {**data["outputs"][0], key: draw(VALUES)}
        else:
            data[key] = draw(VALUES)
    return data


@settings(max_examples=200, deadline=None)
@given(st.one_of(stations(), VALUES))
def test_any_structure_gives_a_station_or_a_config_error(data):
    try:
        cfg = from_mapping(StationConfig, data, "station.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("station.yaml")
        return
    assert isinstance(cfg, StationConfig)


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(KEYS + TAGS + [":", " ", "\n", "  ", "- ", "[", "]", "{", "}", "&a", "*a", "!!binary",
                                            "!!python/object:os.system", "2001-13-45", "0x1F", ".nan", "'", '"', "#",
                                            "? ", "|", ">", "~", "1e400"]), max_size=60).map("".join),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=YAML_TEXT)
def test_any_station_file_text_gives_a_station_or_a_config_error(tmp_path, text):
    path = tmp_path / "station.yaml"
    path.write_text(text, errors="surrogatepass")
    try:
        cfg = load_station(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(cfg, StationConfig)


def test_known_non_config_errors_from_yaml_and_paths_are_config_errors(tmp_path):
    # Found by the fuzzers above: PyYAML raises ValueError for an impossible date and RecursionError for deep
    # nesting, and path resolution raises for NUL bytes or an unknown ~user. Each must name the file.
    cases = {
        "date": "bundle: b\nsource: {type: folder, path: f}\nwhen: 2001-13-45\n",
        "nesting": "bundle: " + "[" * 3000 + "]" * 3000 + "\n",
        "nul": 'bundle: "a\\0b"\nsource: {type: folder, path: f}\n',
        "user": "bundle: ~nobody_such_user/b\nsource: {type: folder, path: f}\n",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        try:
            load_station(path)
        except ConfigError as exc:
            assert str(path) in str(exc), name
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from None


def test_non_finite_numbers_are_config_errors():
    # YAML's .nan slips past every "must be > 0" check (all comparisons with NaN are false): a NaN deadline would
    # never fire and a NaN read timeout would spin the loop. No station setting means anything as NaN or inf.
    for key, sub in (("recovery", "read_timeout_s"), ("inference", "deadline_ms"), ("logging", "stats_interval_s")):
        for value in (float("nan"), float("inf")):
            data = {**BASE, key: {sub: value}}
            try:
                from_mapping(StationConfig, data, "station.yaml")
            except ConfigError as exc:
                assert f"{key}.{sub}" in str(exc)
            else:
                raise AssertionError(f"{key}.{sub}: {value} was accepted")


def test_huge_integers_are_config_errors():
    # YAML integers are unbounded: float(10**400) raises OverflowError, and a 400-digit thread count would reach
    # onnxruntime. Either must be a ConfigError naming the key.
    for key, sub in (("recovery", "read_timeout_s"), ("inference", "threads")):
        data = {**BASE, key: {sub: 10**400}}
        try:
            from_mapping(StationConfig, data, "station.yaml")
        except ConfigError as exc:
            assert f"{key}.{sub}" in str(exc)
        else:
            raise AssertionError(f"{key}.{sub}: 10**400 was accepted")
