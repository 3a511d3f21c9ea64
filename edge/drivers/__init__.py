"""Field drivers: Modbus TCP, local MQTT, files (incl. 1-wire), commands, a simulator."""

from millrace.edge.drivers.base import PollGroup, ReadFailure, ReadResult, Sink, Value

__all__ = ["PollGroup", "ReadFailure", "ReadResult", "Sink", "Value"]
