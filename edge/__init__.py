"""The edge agent: drivers, windows, durable outbox, TLS publisher, health and commands.

Only the light, I/O-free pieces are re-exported; the agent itself lives in
`edge.agent` (imported by `millrace edge run`).
"""

from edge.config import AgentConfig, SignalConfig, load_config, parse_config
from edge.pipeline import Pipeline
from edge.windows import WindowAggregator

__all__ = [
    "AgentConfig",
    "Pipeline",
    "SignalConfig",
    "WindowAggregator",
    "load_config",
    "parse_config",
]
