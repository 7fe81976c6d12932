"""Line outputs of the daemon and the registry that builds one from its config dataclass.

Importing this package needs none of the optional I/O libraries: gpiod, pyserial, pymodbus, paho-mqtt and asyncua are imported only
when an output of that kind starts.
"""
from __future__ import annotations

from typing import Union

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.outputs.fake_output import RecordingOutput, RecordingOutputConfig
from edge_runtime.outputs.gpio_output import GpioConfig, GpioLine, GpioOutput
from edge_runtime.outputs.modbus_output import ModbusConfig, ModbusOutput
from edge_runtime.outputs.mqtt_output import MqttConfig, MqttOutput
from edge_runtime.outputs.ng_image_store import NgImageStore, NgImageStoreConfig
from edge_runtime.outputs.opcua_server import OpcUaConfig, OpcUaServer
from edge_runtime.outputs.result_log import ResultLog, ResultLogConfig, last_frame_id
from edge_runtime.outputs.serial_output import SerialConfig, SerialOutput

# A tagged union for edge_runtime.schema: the `type` key of each mapping picks the dataclass.
OutputConfig = Union[ResultLogConfig, GpioConfig, SerialConfig, ModbusConfig, NgImageStoreConfig,
                     RecordingOutputConfig, MqttConfig, OpcUaConfig]

OUTPUT_CLASSES: dict[type, type[Output]] = {
    ResultLogConfig: ResultLog,
    GpioConfig: GpioOutput,
    SerialConfig: SerialOutput,
    ModbusConfig: ModbusOutput,
    NgImageStoreConfig: NgImageStore,
    RecordingOutputConfig: RecordingOutput,
    MqttConfig: MqttOutput,
    OpcUaConfig: OpcUaServer,
}


def build_output(cfg: OutputConfig) -> Output:
    """The Output for one config dataclass (not started: the daemon calls start())."""
    cls = OUTPUT_CLASSES.get(type(cfg))
    if cls is None:
        raise TypeError(f"no output is registered for config {type(cfg).__name__}")
    return cls(cfg)


__all__ = [
    "GpioConfig", "GpioLine", "GpioOutput", "ModbusConfig", "ModbusOutput", "MqttConfig", "MqttOutput", "NgImageStore", "NgImageStoreConfig", "OpcUaConfig", "OpcUaServer",
    "OUTPUT_CLASSES", "Output", "OutputConfig", "OutputError", "RecordingOutput", "RecordingOutputConfig",
    "ResultLog", "ResultLogConfig", "SerialConfig", "SerialOutput", "build_output", "last_frame_id",
]
