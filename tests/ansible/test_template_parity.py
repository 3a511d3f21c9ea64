"""millrace and Ansible render every template to the same bytes.

The roles render millrace/ops/templates/ with `lookup('ansible.builtin.template', ...,
template_vars=...)`; here that very lookup plugin renders each template with the context
millrace itself passes (recorded from the real render functions) and the output is
compared byte for byte. Ansible runs in a subprocess: its plugin loader installs import
hooks that must not leak into the rest of the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from millrace.ops import broker, provision, templating

pytestmark = pytest.mark.ansible

TEMPLATES = Path(templating.__file__).parent / templating.PACKAGE_DIR
ROLE_DIR = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "edge_agent"

_ANSIBLE_RENDER = """
import json, sys, warnings
warnings.simplefilter("ignore")
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader, lookup_loader
from ansible.template import Templar

init_plugin_loader()
loader = DataLoader()
templar = Templar(loader=loader)
lookup = lookup_loader.get("ansible.builtin.template", loader=loader, templar=templar)
cases = json.load(sys.stdin)
out = [lookup.run([path], variables={}, template_vars=ctx)[0] for path, ctx in cases]
json.dump(out, sys.stdout)
"""


def _ansible_render(cases: list[tuple[Path, Mapping[str, Any]]]) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _ANSIBLE_RENDER],
        input=json.dumps([(str(path), dict(ctx)) for path, ctx in cases]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rendered: list[str] = json.loads(result.stdout)
    return rendered


def _packaged_cases(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> list[tuple[Path, Mapping[str, Any], str]]:
    """(template file, context, millrace's output) for every packaged template, as used."""
    cases: list[tuple[Path, Mapping[str, Any], str]] = []

    def recording(name: str, context: Mapping[str, Any]) -> str:
        text = templating.render_packaged(name, context)
        cases.append((TEMPLATES / name, context, text))
        return text

    monkeypatch.setattr(broker, "render_packaged", recording)
    monkeypatch.setattr(provision, "render_packaged", recording)
    for devices, services, admins in (
        ([], [], []),
        (["dev-1"], [], []),
        ([], ["svc-1"], []),
        (["dev-1", "dev-2"], ["svc-1", "svc-2"], ["svc-2"]),
    ):
        broker.render_dynsec(device_ids=devices, service_ids=services, admin_ids=admins)
    pki_dir, dynsec, data = tmp_path / "pki", tmp_path / "dynsec.json", tmp_path / "data"
    plugin = tmp_path / "plugin.so"
    broker.render_mosquitto_conf(
        pki_dir=pki_dir, dynsec_file=dynsec, dynsec_plugin=plugin, persistence_dir=data
    )
    broker.render_mosquitto_conf(
        pki_dir=pki_dir,
        dynsec_file=dynsec,
        dynsec_plugin=plugin,
        persistence_dir=data,
        port=18883,
        bind_address="0.0.0.0",
        user="mosquitto",
        log_file=tmp_path / "mosquitto.log",
        clientid_from_certificate=False,
    )
    provision.render_agent_config(
        None, provision.agent_config_context("gw-1", broker_host="mqtt.example")
    )
    provision.render_unit(provision.unit_context("gw-1"))
    provision.render_unit(provision.unit_context("gw-1", devices=["/dev/ttyUSB0", "/dev/ttyS1"]))
    covered = {path for path, _, _ in cases}
    assert covered == set(TEMPLATES.rglob("*.tmpl")), "every packaged template is covered"
    return cases


# Templates a plant might write: trim_blocks, trailing newlines, None, filters, includes.
USER_TEMPLATES: list[tuple[str, dict[str, Any]]] = [
    ("a{% if flag %}b{% endif %}\n", {"flag": False}),
    ("{{ value }}\n", {"value": "ends in a newline\n"}),
    ("x={{ value }}\n\n\n", {"value": None}),
    ("items:\n{% for s in items %}\n  - {{ s | upper }}\n{% endfor %}\n", {"items": []}),
    ("items:\n{% for s in items %}\n  - {{ s | upper }}\n{% endfor %}\n", {"items": ["a"]}),
    ("  {% if flag %}\n  indented\n  {% endif %}\nend", {"flag": True}),
    ("{%- if flag -%}\n y \n{%- endif %}\n{# note #}\nz\n", {"flag": 1}),
    (
        "{{ items | join(', ') }} {{ items | length }} {{ n // 2 }} {{ n / 4 }} {{ d }}\n",
        {"items": ["a", "b"], "n": 7, "d": {"k": [1, True, None]}},
    ),
    ('{{ "%05.1f" | format(f) }} {{ s | replace("a", "b") }} {{ s | default("z") }}\n', {"f": 2.5}),
    ('device_id = "{{ device_id }}"\n{% include "signals.toml" %}\n', {"device_id": "gw-2"}),
]


def test_millrace_and_ansible_render_every_template_to_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    packaged = _packaged_cases(monkeypatch, tmp_path)
    (tmp_path / "signals.toml").write_text('[[signals]]\nmetric = "{{ device_id }}.load"\n')
    cases = list(packaged)
    for i, (text, context) in enumerate(USER_TEMPLATES):
        path = tmp_path / f"user-{i}.tmpl"
        path.write_text(text)
        context = {"s": "abc", **context}
        cases.append((path, context, templating.render_file(path, context)))
    by_ansible = _ansible_render([(path, context) for path, context, _ in cases])
    for (path, _, ours), theirs in zip(cases, by_ansible, strict=True):
        assert ours == theirs, path.name


_ANSIBLE_DEVICES = """
import json, sys, warnings
warnings.simplefilter("ignore")
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import init_plugin_loader
from ansible.template import Templar, trust_as_template

init_plugin_loader()
expression, variables = json.load(sys.stdin)
templar = Templar(loader=DataLoader(), variables=variables)
print(json.dumps(templar.template(trust_as_template(expression))))
"""


def test_role_finds_the_devices_a_config_names_as_provision_does(tmp_path: Path) -> None:
    """issue 14: the unit allows the serial devices the config names, however it is rendered."""
    import yaml

    role_vars = yaml.safe_load((ROLE_DIR / "vars" / "main.yml").read_text())
    expression = role_vars["__edge_agent_unit_context"]["devices"]
    template = tmp_path / "agent.toml.tmpl"
    template.write_text(
        'device_id = "{{ device_id }}"\n[[signals]]\nmetric = "meter"\ndriver = "file"\n'
        'path = "/dev/ttyUSB0"\n[[signals]]\nmetric = "flow"\ndriver = "command"\n'
        "command = ['/usr/local/bin/read-m-bus', '/dev/ttyS1', \"--baud=2400\"]\n"
        '[[signals]]\nmetric = "again"\ndriver = "file"\npath = "/dev/ttyUSB0"\n'
    )
    context = {"device_id": "gw-1"}
    variables = {
        "edge_agent_config_template": str(template),
        "__edge_agent_config_context": context,
    }
    result = subprocess.run(
        [sys.executable, "-c", _ANSIBLE_DEVICES],
        input=json.dumps([expression, variables]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    config = templating.render_file(template, context)
    assert json.loads(result.stdout) == provision.config_devices(config)
    assert provision.config_devices(config) == ["/dev/ttyS1", "/dev/ttyUSB0"]
