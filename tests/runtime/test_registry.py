"""Adapters declared once: the station schema and the builders read the source and output registries."""
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from edge_runtime.config import StationConfig
from edge_runtime.outputs import OUTPUTS, Output, build_output
from edge_runtime.registry import Registry
from edge_runtime.schema import ConfigError, from_mapping


@dataclass(kw_only=True)
class BeaconConfig:
    type: Literal["beacon"] = "beacon"
    colour: str = "red"


def _station(outputs):
    return {"bundle": "b", "source": {"type": "folder", "path": "/tmp"}, "outputs": outputs}


def test_a_new_output_is_one_declaration():
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.type: expected one of .*'result_log'.*got 'beacon'"):
        from_mapping(StationConfig, _station([{"type": "beacon"}]), "<station>")

    @OUTPUTS.register(BeaconConfig)
    class Beacon(Output):
        def __init__(self, cfg: BeaconConfig) -> None:
            self.cfg = cfg

        def publish(self, result) -> None:
            pass

    try:
        cfg = from_mapping(StationConfig, _station([{"type": "beacon", "colour": "amber"}]), "<station>")
        assert cfg.outputs == [BeaconConfig(colour="amber")]
        built = build_output(cfg.outputs[0])
        assert isinstance(built, Beacon) and built.cfg.colour == "amber"
        with pytest.raises(ConfigError, match=r"outputs\[0\]: unknown key 'size'"):
            from_mapping(StationConfig, _station([{"type": "beacon", "size": 3}]), "<station>")
    finally:
        OUTPUTS.unregister(BeaconConfig)
    with pytest.raises(ConfigError, match="got 'beacon'"):
        from_mapping(StationConfig, _station([{"type": "beacon"}]), "<station>")


def test_registry_refuses_ambiguous_or_untagged_declarations():
    reg = Registry("output")
    reg.register(BeaconConfig)(object)

    @dataclass
    class OtherBeacon:
        type: Literal["beacon"] = "beacon"

    with pytest.raises(TypeError, match="'beacon' is declared twice"):
        reg.register(OtherBeacon)(object)

    @dataclass
    class NoTag:
        colour: str = "red"

    with pytest.raises(TypeError, match="needs a field `type: Literal"):
        reg.register(NoTag)
    with pytest.raises(TypeError, match="no output is registered for config NoTag"):
        reg.build(NoTag())


def test_test_doubles_are_not_in_the_station_schema():
    """The product alone (no test suite imported) refuses the doubles' keys and names what it takes."""
    code = ("from edge_runtime.config import StationConfig\n"
            "from edge_runtime.schema import ConfigError, from_mapping\n"
            "for m in ({'bundle': 'b', 'source': {'type': 'scripted'}},\n"
            "          {'bundle': 'b', 'source': {'type': 'folder', 'path': '/tmp'}, 'outputs': [{'type': 'recording'}]}):\n"
            "    try:\n"
            "        from_mapping(StationConfig, m, 'st')\n"
            "    except ConfigError as e:\n"
            "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["st.source.type: expected one of 'folder', 'camera', 'video', 'paced', got 'scripted'",
                   "st.outputs[0].type: expected one of 'result_log', 'gpio', 'serial', 'modbus', 'ng_images', "
                   "'mqtt', 'opcua', got 'recording'"]
