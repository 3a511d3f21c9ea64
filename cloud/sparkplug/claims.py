"""Which Sparkplug source owns each millrace device id, so two sources are never merged.

Sparkplug ids are case-sensitive and may contain `.`, while the mapping (names.py)
lowercases and joins with `.`: `Plant/Line1` and `plant/line1`, or group `a.b` node `c`
and group `a` node `b.c`, map to one millrace device. Merged, their readings would fall
into the same windows of one series, wrong and unflagged. So the first source whose
birth is accepted under an id owns it for the life of the host process; another
source's births, data and deaths for that id are refused `id_collision`. A claim
outlives the owner's session (NDEATH, DDEATH): a colliding node that reconnects first
must not take over the device's history. A restart decides again by first birth
(docs/sparkplug.md, *Mapping*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

ID_COLLISION: Final = "id_collision"


@dataclass(frozen=True, slots=True)
class Source:
    """A Sparkplug edge node (device None) or device, with its ids as published."""

    group: str
    node: str
    device: str | None = None

    def __str__(self) -> str:
        tail = "" if self.device is None else f"/{self.device}"
        return f"{self.group}/{self.node}{tail}"


class Claims:
    """Millrace device id -> the Sparkplug source that first had a birth accepted under it."""

    def __init__(self) -> None:
        self._owners: dict[str, Source] = {}

    def claim(self, source: Source, device: str) -> str | None:
        """Claim `device` for `source` if nobody holds it; the refusal's reason if another does."""
        owner = self._owners.setdefault(device, source)
        return None if owner == source else self._reason(source, device, owner)

    def refusal(self, source: Source, device: str) -> str | None:
        """The reason to refuse `source`'s message for `device`, None if it may pass."""
        owner = self._owners.get(device)
        return None if owner is None or owner == source else self._reason(source, device, owner)

    @staticmethod
    def _reason(source: Source, device: str, owner: Source) -> str:
        return (
            f"Sparkplug {str(source)!r} maps to millrace device {device!r}, already owned by "
            f"{str(owner)!r} (first to birth since the host started): rename one of them "
            "in its edge node's configuration"
        )
