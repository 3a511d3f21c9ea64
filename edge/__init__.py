"""The edge agent: drivers, windows, durable outbox, TLS publisher, health and commands.

Only the light, I/O-free pieces are re-exported; the agent itself lives in
`millrace.edge.agent` (imported by `millrace edge run`).
"""

from millrace.edge.config import AgentConfig, SignalConfig, load_config, parse_config
from millrace.edge.pipeline import Pipeline
from millrace.edge.windows import WindowAggregator

__all__ = [
    "AgentConfig",
    "Pipeline",
    "SignalConfig",
    "WindowAggregator",
    "load_config",
    "parse_config",
]
