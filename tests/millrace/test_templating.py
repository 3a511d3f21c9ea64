"""The template renderer: real Jinja2, strict about undefined names, errors that say where."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from millrace.errors import ConfigError
from millrace.ops import pki, provision, templating


def _render(tmp_path: Path, text: str, **context: object) -> str:
    template = tmp_path / "t.tmpl"
    template.write_text(text)
    return templating.render_file(template, context)


def test_filters_and_expressions_are_real_jinja(tmp_path: Path) -> None:
    text = "{{ x | upper }} {{ items | join(',') }} {{ n * 2 }} {{ missing | default('d') }}\n"
    assert _render(tmp_path, text, x="plant", items=["a", "b"], n=21) == "PLANT a,b 42 d\n"


def test_block_tags_swallow_their_newline_and_trailing_newlines_stay(tmp_path: Path) -> None:
    text = "a\n{% for s in services %}\nuser {{ s }}\n{% endfor %}\n{% if flag %}\nf\n{% endif %}\n"
    assert _render(tmp_path, text, services=["s1", "s2"], flag=False) == "a\nuser s1\nuser s2\n"
    assert _render(tmp_path, "x={{ v }}\n\n", v=None) == "x=\n\n"


def test_unknown_variable_is_a_config_error_naming_it_the_template_and_line(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as caught:
        _render(tmp_path, 'id = "{{ device_id }}"\nhost = "{{ brokr_host }}"\n', device_id="d")
    message = str(caught.value)
    assert "'brokr_host' is undefined" in message
    assert f"{tmp_path / 't.tmpl'}, line 2" in message
    assert "variables: device_id" in message
    with pytest.raises(ConfigError, match=r"line 1: .*'dict object' has no attribute 'hots'"):
        _render(tmp_path, "{{ broker.hots }}\n", broker={"host": "h"})


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("a\nb\n{{ x | no_such_filter }}\n", 3, "No filter named 'no_such_filter'"),
        ("a\n{% if x %}\nb\n", 3, "Unexpected end of template"),
        ("{{ x }\n", 1, "unexpected '}'"),
        ("a\n\n{{ x + 1 }}\n", 3, "can only concatenate str"),
    ],
)
def test_syntax_and_filter_errors_name_the_template_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _render(tmp_path, text, x="s")
    assert str(caught.value).startswith(f"{tmp_path / 't.tmpl'}, line {line}: ")
    assert problem in str(caught.value)


def test_includes_resolve_next_to_a_user_template_and_errors_name_the_included_file(
    tmp_path: Path,
) -> None:
    (tmp_path / "signals.toml").write_text('[[signals]]\nmetric = "{{ device_id }}.x"\n')
    text = 'device_id = "{{ device_id }}"\n{% include "signals.toml" %}\n'
    assert _render(tmp_path, text, device_id="d1") == (
        'device_id = "d1"\n[[signals]]\nmetric = "d1.x"\n'
    )
    (tmp_path / "signals.toml").write_text("\n{{ metric_prefix }}\n")
    with pytest.raises(ConfigError, match=r"signals\.toml, line 2: 'metric_prefix' is undefined"):
        _render(tmp_path, text, device_id="d1")
    with pytest.raises(ConfigError, match="included template 'nope' not found"):
        _render(tmp_path, "{% include 'nope' %}\n")
    with pytest.raises(ConfigError, match="no such template file"):
        templating.render_file(tmp_path / "absent.tmpl", {})


def test_every_packaged_template_renders_with_what_millrace_provides(tmp_path: Path) -> None:
    # StrictUndefined: a placeholder millrace does not fill would raise here.
    config = provision.render_agent_config(
        None, provision.agent_config_context("gw-1", broker_host="mqtt.example")
    )
    assert 'device_id = "gw-1"' in config
    assert "WatchdogSec=60\n" in provision.render_unit(provision.unit_context("gw-1"))


def test_cli_reports_a_template_mistake_on_one_line_and_issues_nothing(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    pki.init_pki(pki_dir, hosts=["mqtt.plant.example"])
    template = tmp_path / "agent.toml.tmpl"
    template.write_text('device_id = "{{ device_id }}"\n\nport = {{ broker_port | int(bas=8) }}\n')
    wheel = tmp_path / "millrace_edge-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"never read: the template fails first")
    args = ["gw-9", "--pki", str(pki_dir), "--out", str(tmp_path / "b.tar.gz")]
    args += ["--config", str(template), "--wheel", str(wheel)]
    result = subprocess.run(
        [sys.executable, "-m", "millrace.cli", "provision", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"{template}, line 3: " in result.stderr
    assert not pki.pki_paths(pki_dir).cert_for("gw-9").exists()


def test_unit_allows_the_serial_devices_the_config_names() -> None:
    """issue 14: PrivateDevices=yes hid /dev/tty*, which serial field buses need."""
    config = (
        'device_id = "gw-1"\n[[signals]]\nmetric = "meter"\ndriver = "file"\n'
        'path = "/dev/ttyUSB0"\n[[signals]]\nmetric = "flow"\ndriver = "command"\n'
        'command = ["/usr/local/bin/read-m-bus", "/dev/ttyS1"]\n'
    )
    devices = provision.config_devices(config)
    assert devices == ["/dev/ttyS1", "/dev/ttyUSB0"]
    unit = provision.render_unit(provision.unit_context("gw-1", devices=devices))
    lines = unit.splitlines()
    assert "PrivateDevices=no" in lines and "PrivateDevices=yes" not in lines
    assert "DevicePolicy=closed" in lines
    assert "DeviceAllow=/dev/ttyS1 rw" in lines and "DeviceAllow=/dev/ttyUSB0 rw" in lines
    assert "SupplementaryGroups=dialout" in lines
    for kept in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet="):
        assert kept in lines
    # A config naming no device keeps /dev private.
    plain = provision.render_unit(provision.unit_context("gw-1"))
    assert "PrivateDevices=yes" in plain.splitlines() and "DeviceAllow" not in plain
