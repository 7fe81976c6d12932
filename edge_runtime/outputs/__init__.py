"""Line outputs of the daemon and the registry that builds one from its config dataclass.

Importing this package needs none of the optional I/O libraries: gpiod, pyserial, pymodbus, paho-mqtt and asyncua are imported only
when an output of that kind starts.
"""
from __future__ import annotations

from typing import Any

# Each import registers its output with OUTPUTS (edge_runtime.registry); the order is the one error messages list.
from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.outputs.result_log import ResultLog, ResultLogConfig, last_frame_id
from edge_runtime.outputs.gpio_output import GpioConfig, GpioLine, GpioOutput
from edge_runtime.outputs.serial_output import SerialConfig, SerialOutput
from edge_runtime.outputs.modbus_output import ModbusConfig, ModbusOutput
from edge_runtime.outputs.ng_image_store import NgImageStore, NgImageStoreConfig
from edge_runtime.outputs.mqtt_output import MqttConfig, MqttOutput
from edge_runtime.outputs.opcua_server import OpcUaConfig, OpcUaServer

# The station file's `outputs:` items: a tagged union of the registered configs, chosen by the `type` key.
OutputConfig: Any = OUTPUTS.annotation


def build_output(cfg: Any) -> Output:
    """The Output for one config dataclass (not started: the daemon calls start())."""
    return OUTPUTS.build(cfg)


__all__ = [
    "GpioConfig", "GpioLine", "GpioOutput", "ModbusConfig", "ModbusOutput", "MqttConfig", "MqttOutput", "NgImageStore",
    "NgImageStoreConfig", "OpcUaConfig", "OpcUaServer", "OUTPUTS", "Output", "OutputConfig", "OutputError", "ResultLog",
    "ResultLogConfig", "SerialConfig", "SerialOutput", "build_output", "last_frame_id",
]
