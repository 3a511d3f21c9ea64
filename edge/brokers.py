"""Which of the plant's brokers the agent uses: preference, failover, failback.

With `[broker] hosts = [...]` the agent knows several brokers that share one
authorization (docs/operations.md "Broker failover"). Its *preferred* broker is
`crc32(device id) % len(hosts)` (`spread = true`, the default), so a fleet
spreads evenly over the brokers without per-device settings; with
`spread = false` it is the first listed. The others are tried after it in list
order. A lost or refused broker moves the agent to the next one at once (no
backoff until every broker failed in a row); while it is away from its preferred
broker it checks it every `failback_s` and moves back once it answers, so the
brokers share the load again after a repair.
"""

from __future__ import annotations

import socket
import ssl
import zlib
from collections.abc import Sequence
from typing import Final

Endpoint = tuple[str, int]

# A failback check is one TLS handshake: a broker that takes longer is not back yet.
PROBE_TIMEOUT_SECONDS: Final = 3.0


def preferred_index(device_id: str, count: int, *, spread: bool) -> int:
    """The preferred broker's index: stable per device, even over a fleet when `spread`."""
    if not spread or count <= 1:
        return 0
    return zlib.crc32(device_id.encode()) % count


class BrokerChoice:
    """The order to try brokers in, and where the agent is in it (publisher thread only)."""

    def __init__(self, endpoints: Sequence[Endpoint], device_id: str, *, spread: bool) -> None:
        first = preferred_index(device_id, len(endpoints), spread=spread)
        self.order: tuple[Endpoint, ...] = tuple(endpoints[first:]) + tuple(endpoints[:first])
        self._at = 0
        self._failed_in_row = 0

    @property
    def current(self) -> Endpoint:
        """The broker to connect to next (or connected to now)."""
        return self.order[self._at]

    @property
    def preferred(self) -> Endpoint:
        return self.order[0]

    @property
    def away(self) -> bool:
        """Using another broker than the preferred one (failback checks are due)."""
        return self._at != 0

    def connected(self) -> None:
        self._failed_in_row = 0

    def failed(self) -> bool:
        """The current broker failed or was lost: move on. True if a backoff is due first
        (every broker failed in a row, or there is only one)."""
        self._at = (self._at + 1) % len(self.order)
        self._failed_in_row += 1
        if len(self.order) == 1 or self._failed_in_row >= len(self.order):
            self._failed_in_row = 0
            return True
        return False

    def back_to_preferred(self) -> None:
        self._at = 0
        self._failed_in_row = 0


def answers(endpoint: Endpoint, context: ssl.SSLContext) -> bool:
    """The broker completes a TLS handshake with our certificate (a failback check)."""
    host, port = endpoint
    try:
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False
