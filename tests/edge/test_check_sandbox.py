"""`edge check --sandbox` takes the agent unit's sandbox, and nothing that makes it a service.

The settings come from the unit itself (`systemctl cat`, drop-ins included), so the check's
sandbox cannot drift from the agent's; tests/system/test_flashing.py runs it on a booted
gateway.
"""

from __future__ import annotations

from millrace.edge.sandbox import service_settings
from millrace.ops.provision import render_unit, unit_context

DROP_IN = """
# /etc/systemd/system/millrace-edge.service.d/local.conf
[Service]
WatchdogSec=10
ReadOnlyPaths=/srv/plant
"""


def test_sandbox_takes_every_hardening_line_of_the_unit_and_none_of_its_lifecycle() -> None:
    unit = render_unit(unit_context("gw-1", devices=["/dev/ttyUSB0"]))
    settings = service_settings(f"# /etc/systemd/system/millrace-edge.service\n{unit}{DROP_IN}")
    for line in (
        "User=millrace",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/millrace",
        "DeviceAllow=/dev/ttyUSB0 rw",
        "SystemCallFilter=@system-service adjtimex clock_adjtime",
        "CapabilityBoundingSet=",
        "ReadOnlyPaths=/srv/plant",
    ):
        assert line in settings, (line, settings)
    keys = {line.partition("=")[0] for line in settings}
    assert not keys & {"Type", "ExecStart", "WatchdogSec", "Restart", "NotifyAccess"}, keys
    # [Unit] and [Install] lines are not sandbox settings.
    assert not keys & {"Description", "After", "StartLimitBurst", "WantedBy"}, keys
