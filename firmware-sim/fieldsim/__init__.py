"""fieldsim: simulated field devices (Modbus TCP PLC, MQTT sensor node, 1-wire) with ground truth.

The platform reaches these devices only over their protocols; nothing in
millrace, edge or cloud imports this package.
"""

from millrace.fieldsim.models import machine_state_at, running_seconds_at, value_at

__all__ = ["machine_state_at", "running_seconds_at", "value_at"]
