"""Constants shared by the simulated devices; names carry their units."""

from __future__ import annotations

from typing import Final

# Every served value is constant for one period aligned on Unix time, so a
# reader and a test agree on which value was served when.
DEFAULT_RESOLUTION_SECONDS: Final = 1.0

DAY_SECONDS: Final = 86_400.0

# The machine state machine draws one state per slot. The draw pattern repeats
# every STATE_PERIOD_SLOTS (one week) so running time, and with it the
# counters, has a closed form at any t without replaying history.
STATE_SLOT_SECONDS: Final = 300.0
STATE_PERIOD_SLOTS: Final = 2016
STATE_RUNNING: Final = 0
STATE_IDLE: Final = 1
STATE_FAULT: Final = 2
# Share of slots drawn as running / idle; the rest are machine faults.
STATE_RUNNING_SHARE: Final = 0.82
STATE_IDLE_SHARE: Final = 0.14

# Fault "spike": share of steps that carry a spike, and its size in units of
# the signal's valid span (valid_max - valid_min).
SPIKE_SHARE: Final = 0.5
SPIKE_SPAN_FACTOR: Final = 3.0
# Fault "slow" default delay when a fault does not give one.
SLOW_DELAY_SECONDS: Final = 2.0

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_BASE_PORT: Final = 15020
DEFAULT_MQTT_PORT: Final = 1883
DEFAULT_TOPIC_PREFIX: Final = "fieldsim"
DEFAULT_GATEWAY_PREFIX: Final = "gw"

# Ground truth is buffered in memory and written this often (and on stop).
GROUND_TRUTH_FLUSH_SECONDS: Final = 1.0

# MQTT node: reconnect pause after a failed connection, and keepalive.
MQTT_RECONNECT_SECONDS: Final = 1.0
MQTT_KEEPALIVE_SECONDS: Final = 30

MANIFEST_VERSION: Final = 1
