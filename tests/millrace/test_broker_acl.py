"""The broker's security, proven against the real mosquitto with the generated config.

Negative checks never sleep: after a forbidden publish the same client publishes a marker
on a topic it may use; the broker handles one connection's packets in order, so once the
marker has arrived anything the forbidden publish would have delivered has arrived too.

The first tests are pure unit tests of the templates and the client builder.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.reasoncodes import ReasonCode

from millrace.edge.commands import COMMAND_NAMES
from millrace.errors import ConfigError, PKIError
from millrace.mqtt import tls_client
from millrace.ops import broker as broker_config
from millrace.ops import pki
from millrace.ops.broker_sync import plan_commands
from millrace.wire import MAX_PAYLOAD_BYTES
from tests.fixtures.fix_broker import ADMIN_ID, BIND_ADDRESS, MosquittoServer, PKIFixture

WAIT_SECONDS = 10.0
NOT_AUTHORIZED = 0x87
Connect = Callable[..., paho.Client]


# -- helpers -----------------------------------------------------------------------------


class Inbox:
    """Collects a client's messages; `wait_for` is the barrier the negative tests use."""

    def __init__(self, client: paho.Client) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        client.on_message = self._on_message

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, payload: bytes) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(p == payload for _, p in self.messages), WAIT_SECONDS
            )
        assert ok, f"{payload!r} never arrived; got {self.messages}"

    @property
    def payloads(self) -> set[bytes]:
        with self._cond:
            return {p for _, p in self.messages}

    @property
    def topics(self) -> set[str]:
        with self._cond:
            return {t for t, _ in self.messages}


class Acks:
    """PUBACK and SUBACK reason codes of one client, by message id."""

    def __init__(self, client: paho.Client) -> None:
        self._client = client
        self._codes: dict[int, list[ReasonCode]] = {}
        self._cond = threading.Condition()
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe

    def _store(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._cond:
            self._codes[mid] = codes
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, code: ReasonCode, _p: Any) -> None:
        self._store(mid, [code])

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        self._store(mid, list(codes))

    def _wait(self, mid: int) -> list[ReasonCode]:
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._codes, WAIT_SECONDS), mid
            return self._codes.pop(mid)

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish with QoS 1 and return the broker's PUBACK reason code."""
        info = self._client.publish(topic, payload, qos=1)
        return self._wait(info.mid)[0]

    def subscribe(self, topic_filter: str) -> ReasonCode:
        result, mid = self._client.subscribe(topic_filter, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS
        assert mid is not None
        return self._wait(mid)[0]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _connect_packet(client_id: str) -> bytes:
    """A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60 s)."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


def attempt(
    server: MosquittoServer,
    context: ssl.SSLContext | None,
    *,
    server_hostname: str | None = None,
) -> str:
    """'accepted' if the broker answers CONNECT with CONNACK 0, else what went wrong."""
    try:
        with socket.create_connection((BIND_ADDRESS, server.port), timeout=WAIT_SECONDS) as raw:
            sock: socket.socket = raw
            if context is not None:
                sock = context.wrap_socket(raw, server_hostname=server_hostname or server.host)
            sock.sendall(_connect_packet(_unique("probe")))
            answer = sock.recv(4)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    if answer[:2] == b"\x20\x02" and answer[3:4] == b"\x00":
        return "accepted"
    return f"refused: answer {answer!r}"


def client_context(
    ca: Path, cert_id: str | None = None, pki_dir: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert_id is not None:
        assert pki_dir is not None
        paths = pki.pki_paths(pki_dir)
        context.load_cert_chain(paths.cert_for(cert_id), paths.key_for(cert_id))
    return context


def write_expired_crl(pki_dir: Path) -> None:
    """Replace crl.pem with a correctly signed CRL whose nextUpdate has passed."""
    paths = pki.pki_paths(pki_dir)
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - dt.timedelta(days=40))
        .next_update(now - dt.timedelta(days=10))
        .sign(key, hashes.SHA256())
    )
    paths.crl.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "millrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


# -- templates and client builder (unit) -----------------------------------------------------


def _conf(tmp_path: Path, **options: Any) -> str:
    return broker_config.render_mosquitto_conf(
        pki_dir=tmp_path / "pki",
        dynsec_file=tmp_path / "dynsec.json",
        dynsec_plugin=tmp_path / "plugin.so",
        persistence_dir=tmp_path / "data",
        **options,
    )


def _directives(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_conf_has_one_tls_listener_and_no_anonymous_access(tmp_path: Path) -> None:
    conf = _directives(_conf(tmp_path, port=18883, user="mosquitto"))
    assert [d for d in conf if d[0] == "listener"] == [["listener", "18883"]]
    settings = {d[0]: d[1:] for d in conf if d[0] != "log_type"}
    assert settings["per_listener_settings"] == ["false"]
    assert settings["allow_anonymous"] == ["false"]
    assert settings["require_certificate"] == ["true"]
    assert settings["use_identity_as_username"] == ["true"]
    assert settings["tls_version"] == ["tlsv1.2"]
    assert settings["crlfile"] == [str((tmp_path / "pki" / "crl.pem").resolve())]
    assert "acl_file" not in settings  # mosquitto's acl_file never checks SUBSCRIBE
    assert settings["plugin"] == [str((tmp_path / "plugin.so").resolve())]
    assert settings["plugin_opt_config_file"] == [str((tmp_path / "dynsec.json").resolve())]
    assert settings["use_username_as_clientid"] == ["true"]
    assert int(settings["max_packet_size"][0]) == MAX_PAYLOAD_BYTES + 4096
    assert "memory_limit" not in settings  # breaks 2.0.11 with dynsec: see the template
    assert settings["persistence"] == ["true"]
    assert settings["persistence_location"][0].endswith("/")
    assert int(settings["max_inflight_messages"][0]) >= 1000
    assert settings["user"] == ["mosquitto"]
    for insecure in ("password_file", "psk_hint", "allow_zero_length_clientid"):
        assert insecure not in settings


def test_conf_options_bind_log_file_and_clientid(tmp_path: Path) -> None:
    conf = _directives(
        _conf(
            tmp_path,
            bind_address="127.0.0.2",
            log_file=tmp_path / "m.log",
            clientid_from_certificate=False,
        )
    )
    assert ["listener", "8883", "127.0.0.2"] in conf
    assert ["log_dest", "file", str((tmp_path / "m.log").resolve())] in conf
    assert not any(d[0] == "use_username_as_clientid" for d in conf)
    assert not any(d[0] == "user" for d in conf)


def test_conf_refuses_values_mosquitto_would_misread(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="whitespace"):
        broker_config.render_mosquitto_conf(
            pki_dir=tmp_path / "my pki",
            dynsec_file=tmp_path / "dynsec.json",
            dynsec_plugin=tmp_path / "plugin.so",
            persistence_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="bind"):
        _conf(tmp_path, bind_address="1.2.3.4\nallow_anonymous true")
    with pytest.raises(ConfigError, match="port"):
        _conf(tmp_path, port=70000)


def _acls(doc: dict[str, Any], rolename: str) -> set[tuple[str, str]]:
    role = next(r for r in doc["roles"] if r["rolename"] == rolename)
    assert all(a["allow"] for a in role["acls"])
    return {(a["acltype"], a["topic"]) for a in role["acls"]}


def test_dynsec_gives_each_device_its_own_topics_and_services_one_role() -> None:
    doc = json.loads(
        broker_config.render_dynsec(
            device_ids=["dev-b", "dev-a"], service_ids=["svc-a", "adm"], admin_ids=["adm"]
        )
    )
    assert doc["defaultACLAccess"]["subscribe"] is False
    assert doc["defaultACLAccess"]["publishClientSend"] is False
    clients = {c["username"]: [r["rolename"] for r in c["roles"]] for c in doc["clients"]}
    assert clients == {
        "dev-a": ["device-dev-a"],
        "dev-b": ["device-dev-b"],
        "adm": ["service", "broker-admin"],
        "svc-a": ["service"],
    }
    device = _acls(doc, "device-dev-a")
    assert ("subscribePattern", "millrace/v1/d/dev-a/cmd/+") in device
    assert ("subscribeLiteral", "millrace/v1/d/dev-a/receipt") in device
    replies = {t for kind, t in device if t.endswith("/reply")}
    assert replies == {f"millrace/v1/d/dev-a/cmd/{n}/reply" for n in COMMAND_NAMES}
    # Sparkplug B: every node may watch the hosts' STATE (docs/sparkplug.md); nothing else
    # of a device's role names another id.
    own = {t for _, t in device if t != "spBv1.0/STATE/+"}
    assert all("dev-a" in t and "#" not in t and "$" not in t for t in own)
    service = _acls(doc, "service")
    assert ("subscribePattern", "$share/+/millrace/v1/d/+/data") in service
    assert ("publishClientSend", "millrace/v1/d/+/receipt") in service
    assert not any(kind == "publishClientSend" and t.endswith("/data") for kind, t in service)
    with pytest.raises(PKIError, match="invalid id"):
        broker_config.render_dynsec(device_ids=['x", "roles": ['], service_ids=[])
    with pytest.raises(ConfigError, match="service certificate"):
        broker_config.render_dynsec(device_ids=[], service_ids=[], admin_ids=["dev-a"])


def test_broker_config_cli_writes_both_files(test_pki: PKIFixture, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = run_cli(
        "broker", "config", "--pki", str(test_pki.dir), "--out", str(out), "--port", "18999"
    )
    assert result.stdout.split() == [str(out / "mosquitto.conf"), str(out / "dynsec.json")]
    assert "listener 18999\n" in (out / "mosquitto.conf").read_text()
    users = {c["username"] for c in json.loads((out / "dynsec.json").read_text())["clients"]}
    assert {"svc-test", "dev-a", "dev-b"} <= users


def test_tls_client_verifies_the_broker_and_speaks_mqtt5(test_pki: PKIFixture) -> None:
    cert, key = test_pki.files("dev-a")
    client = tls_client("dev-a", ca=test_pki.ca, cert=cert, key=key, clean_start=False)
    context = client._ssl_context
    assert context is not None
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client._tls_insecure is False
    assert client.protocol == paho.MQTTv5
    assert client.millrace_defaults.clean_start is False  # type: ignore[attr-defined]
    assert client.millrace_defaults.session_expiry_seconds > 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="file not found"):
        tls_client("dev-a", ca=test_pki.ca, cert=cert.with_name("nope.crt"), key=key)


def test_base_modules_do_not_import_paho() -> None:
    code = (
        "import sys, millrace.mqtt, millrace.ops.pki, millrace.ops.broker, millrace.ops.pki_cli, "
        "millrace.ops.broker_cli; sys.exit('paho' in ' '.join(sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- against the real broker ---------------------------------------------------------------


@pytest.mark.security
def test_device_publishes_own_topics_and_services_receive_plain_and_shared(
    broker: MosquittoServer, mqtt_connect: Connect
) -> None:
    plain = mqtt_connect(_unique("svc-plain"), "svc-test")
    shared = mqtt_connect(_unique("svc-shared"), "svc-test")
    plain_inbox, shared_inbox = Inbox(plain), Inbox(shared)
    for topic_filter in (
        "millrace/v1/d/+/data",
        "millrace/v1/d/+/state",
        "millrace/v1/d/dev-a/health",
        "millrace/v1/d/+/cmd/+/reply",
    ):
        assert not Acks(plain).subscribe(topic_filter).is_failure, topic_filter
    group = _unique("ingest")
    assert not Acks(shared).subscribe(f"$share/{group}/millrace/v1/d/+/data").is_failure

    device = Acks(mqtt_connect(_unique("dev-a"), "dev-a"))
    payload = _unique("window").encode()
    assert not device.publish("millrace/v1/d/dev-a/data", payload).is_failure
    plain_inbox.wait_for(payload)
    shared_inbox.wait_for(payload)

    for suffix in ("state", "health", "cmd/ping/reply"):
        marker = _unique(suffix).encode()
        assert not device.publish(f"millrace/v1/d/dev-a/{suffix}", marker).is_failure
        plain_inbox.wait_for(marker)
    assert "millrace/v1/d/dev-a/cmd/ping/reply" in plain_inbox.topics


@pytest.mark.security
def test_device_cannot_publish_outside_its_own_topics(
    broker: MosquittoServer, mqtt_connect: Connect
) -> None:
    watcher = mqtt_connect(_unique("svc-watch"), "svc-test")
    watcher_inbox, watcher_acks = Inbox(watcher), Acks(watcher)
    for topic_filter in ("millrace/v1/d/+/data", "millrace/v1/d/+/state", "millrace/v1/d/+/health"):
        assert not watcher_acks.subscribe(topic_filter).is_failure
    assert not watcher_acks.subscribe("millrace/v1/d/+/cmd/+/reply").is_failure
    victim = mqtt_connect(_unique("dev-b"), "dev-b")
    victim_inbox = Inbox(victim)
    assert not Acks(victim).subscribe("millrace/v1/d/dev-b/cmd/+").is_failure

    attacker = Acks(mqtt_connect(_unique("dev-a"), "dev-a"))
    forged = _unique("forged").encode()
    for topic in (
        "millrace/v1/d/dev-b/data",
        "millrace/v1/d/dev-b/state",
        "millrace/v1/d/dev-b/health",
        "millrace/v1/d/dev-b/cmd/ping/reply",
        "millrace/v1/d/dev-a/cmd/open/reply",
        "millrace/v1/d/dev-b/cmd/open",
        "millrace/v1/d/dev-a/cmd/open",
        "millrace/v1/alerts/dev-a",
        "millrace/v1/d/dev-a/data/extra",
        "millrace/v1/d/dev-a",
        "millrace/v2/d/dev-a/data",
    ):
        assert attacker.publish(topic, forged).value == NOT_AUTHORIZED, topic

    marker = _unique("marker").encode()
    assert not attacker.publish("millrace/v1/d/dev-a/data", marker).is_failure
    watcher_inbox.wait_for(marker)
    command_marker = _unique("cmd").encode()
    assert not watcher_acks.publish("millrace/v1/d/dev-b/cmd/ping", command_marker).is_failure
    victim_inbox.wait_for(command_marker)
    assert forged not in watcher_inbox.payloads
    assert forged not in victim_inbox.payloads


@pytest.mark.security
def test_device_cannot_read_plant_data_or_other_devices_commands(
    broker: MosquittoServer, mqtt_connect: Connect
) -> None:
    """Refused at SUBSCRIBE (dynsec), and nothing is delivered either."""
    snoop_client = mqtt_connect(_unique("dev-a"), "dev-a")
    snoop, snoop_acks = Inbox(snoop_client), Acks(snoop_client)
    for topic_filter in (
        "#",
        "millrace/v1/#",
        "millrace/v1/d/+/data",
        "millrace/v1/d/dev-b/cmd/+",
        "millrace/v1/alerts/#",
        f"$share/{_unique('grp')}/millrace/v1/d/+/data",
    ):
        assert snoop_acks.subscribe(topic_filter).value == NOT_AUTHORIZED, topic_filter
    assert not snoop_acks.subscribe("millrace/v1/d/dev-a/cmd/+").is_failure

    service_client = mqtt_connect(_unique("svc"), "svc-test")
    service, service_acks = Inbox(service_client), Acks(service_client)
    assert not service_acks.subscribe("millrace/v1/d/dev-b/data").is_failure
    other = Acks(mqtt_connect(_unique("dev-b"), "dev-b"))
    secret_data = _unique("dev-b-data").encode()
    assert not other.publish("millrace/v1/d/dev-b/data", secret_data).is_failure
    service.wait_for(secret_data)  # it was published; the snooper must not see it
    secret_cmd = _unique("dev-b-cmd").encode()
    assert not service_acks.publish("millrace/v1/d/dev-b/cmd/open", secret_cmd).is_failure
    assert not service_acks.publish("millrace/v1/alerts/dev-b", secret_cmd).is_failure

    marker = _unique("own-cmd").encode()
    assert not service_acks.publish("millrace/v1/d/dev-a/cmd/ping", marker).is_failure
    snoop.wait_for(marker)
    assert all(t.startswith("millrace/v1/d/dev-a/cmd/") for t in snoop.topics), snoop.topics
    assert not {secret_data, secret_cmd} & snoop.payloads


@pytest.mark.security
def test_service_cannot_forge_device_data_but_may_command_and_alert(
    broker: MosquittoServer, mqtt_connect: Connect
) -> None:
    service = Acks(mqtt_connect(_unique("svc"), "svc-test"))
    payload = _unique("svc").encode()
    assert service.publish("millrace/v1/d/dev-a/data", payload).value == NOT_AUTHORIZED
    assert service.publish("millrace/v1/d/dev-a/health", payload).value == NOT_AUTHORIZED
    assert not service.publish("millrace/v1/d/dev-a/cmd/ping", payload).is_failure
    assert not service.publish("millrace/v1/alerts/dev-a", payload).is_failure


@pytest.mark.security
def test_valid_certificate_is_accepted_by_the_raw_probe(broker: MosquittoServer) -> None:
    """The baseline that makes the refusals below mean something."""
    assert attempt(broker, client_context(broker.ca, "dev-a", broker.pki.dir)) == "accepted"


@pytest.mark.security
def test_plain_tcp_to_the_tls_port_is_refused(broker: MosquittoServer) -> None:
    outcome = attempt(broker, None)
    assert outcome.startswith("refused"), outcome
    assert "\\x20\\x02" not in outcome


@pytest.mark.security
def test_tls_without_client_certificate_is_refused(broker: MosquittoServer) -> None:
    outcome = attempt(broker, client_context(broker.ca))
    assert outcome.startswith("refused"), outcome


@pytest.mark.security
def test_certificate_from_another_ca_is_refused(broker: MosquittoServer, tmp_path: Path) -> None:
    rogue = PKIFixture(tmp_path / "rogue")
    rogue.issue("dev-a")  # same CN as a real device
    context = ssl.create_default_context(cafile=str(broker.ca))  # trusts the real broker
    context.load_cert_chain(*rogue.files("dev-a"))
    outcome = attempt(broker, context)
    assert outcome.startswith("refused"), outcome


@pytest.mark.security
def test_clients_check_the_broker_name_and_ca(broker: MosquittoServer, tmp_path: Path) -> None:
    good = client_context(broker.ca, "dev-a", broker.pki.dir)
    outcome = attempt(broker, good, server_hostname="not-the-broker.example")
    assert "SSLCertVerificationError" in outcome, outcome
    rogue = PKIFixture(tmp_path / "rogue")
    outcome = attempt(broker, client_context(rogue.ca, "dev-a", broker.pki.dir))
    assert "SSLCertVerificationError" in outcome, outcome


@pytest.mark.security
def test_revoked_certificate_is_refused_after_reload(
    broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = broker_factory()
    ident = _unique("dev-rev")
    server.pki.issue(ident)
    revoked_ctx = client_context(server.ca, ident, server.pki.dir)
    assert attempt(server, revoked_ctx) == "accepted"
    long_lived = Acks(mqtt_connect(_unique(ident), ident, server=server))

    result = run_cli("pki", "revoke", "--pki", str(server.pki.dir), ident)
    assert "revoked" in result.stdout
    # mosquitto reads crl.pem when it builds the listener's TLS context, not per connection.
    assert attempt(server, revoked_ctx) == "accepted"

    server.reload()
    assert attempt(server, revoked_ctx).startswith("refused")
    assert attempt(server, client_context(server.ca, "dev-b", server.pki.dir)) == "accepted"
    # A reload does not re-check open connections ...
    assert not long_lived.publish(f"millrace/v1/d/{ident}/health", b"still here").is_failure

    server.restart()  # ... a restart cuts them, and the revoked device cannot come back.
    assert attempt(server, revoked_ctx).startswith("refused")
    deadline = time.monotonic() + WAIT_SECONDS
    while long_lived._client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not long_lived._client.is_connected()
    assert attempt(server, client_context(server.ca, "dev-a", server.pki.dir)) == "accepted"


@pytest.mark.security
def test_expired_crl_locks_everyone_out_until_renewed(
    broker_factory: Callable[..., MosquittoServer], tmp_path: Path
) -> None:
    own = PKIFixture(tmp_path / "pki")
    own.issue("dev-a")
    server = broker_factory(pki=own)
    context = client_context(own.ca, "dev-a", own.dir)
    assert attempt(server, context) == "accepted"

    write_expired_crl(own.dir)
    assert pki.crl_days_left(own.dir) < 0
    server.reload()
    outcome = attempt(server, context)
    assert outcome.startswith("refused"), outcome

    run_cli("pki", "renew-crl", "--pki", str(own.dir))
    server.reload()
    assert attempt(server, context) == "accepted"


@pytest.mark.security
def test_issue_and_revoke_take_effect_on_the_running_broker_without_restart(
    broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = broker_factory()
    pid = server.pid
    ident = _unique("svc-new")
    server.pki.issue(ident, role="service")  # the fixture runs `broker sync` at once
    listener = mqtt_connect(_unique(ident), ident, server=server)
    inbox, acks = Inbox(listener), Acks(listener)
    assert not acks.subscribe("millrace/v1/d/+/data").is_failure
    device_id = _unique("dev-new")
    server.pki.issue(device_id)
    device = Acks(mqtt_connect(_unique(device_id), device_id, server=server))
    before = _unique("before").encode()
    assert not device.publish(f"millrace/v1/d/{device_id}/data", before).is_failure
    inbox.wait_for(before)
    assert not acks.publish(f"millrace/v1/d/{device_id}/cmd/ping", b"{}").is_failure

    for revoked in (ident, device_id):
        run_cli("pki", "revoke", "--pki", str(server.pki.dir), revoked)
    result = run_cli(
        "broker",
        "sync",
        "--pki",
        str(server.pki.dir),
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--admin",
        ADMIN_ID,
    )
    assert set(result.stdout.split()) >= {"removed", ident, device_id}
    assert server.pid == pid  # no restart, no reload: the CRL still lets them in
    assert "been disconnected by administrative action" in server.log_text()
    # Connected again with the revoked certificates: no rights left at all.
    device_again = Acks(mqtt_connect(_unique(device_id), device_id, server=server))
    assert device_again.publish(f"millrace/v1/d/{device_id}/data", b"x").value == NOT_AUTHORIZED
    assert device_again.subscribe(f"millrace/v1/d/{device_id}/cmd/+").value == NOT_AUTHORIZED
    service_again = Acks(mqtt_connect(_unique(ident), ident, server=server))
    assert service_again.subscribe("millrace/v1/d/+/data").value == NOT_AUTHORIZED
    assert (
        service_again.publish(f"millrace/v1/d/{device_id}/cmd/ping", b"x").value == NOT_AUTHORIZED
    )
    # Everyone else is untouched.
    watcher = Acks(mqtt_connect(_unique("svc-w"), "svc-test", server=server))
    assert not watcher.subscribe("millrace/v1/d/+/data").is_failure
    assert not watcher.publish("millrace/v1/d/dev-a/cmd/ping", b"{}").is_failure


@pytest.mark.security
@pytest.mark.parametrize(
    "topic_filter",
    [
        "$share/ingest/millrace/v1/d/+/data",
        "$share/x7/millrace/v1/#",
        "millrace/v1/d/dev-b/data",
        "millrace/v1/d/dev-b/cmd/+",
        "#",
        "millrace/v1/#",
        "millrace/v1/d/+/receipt",
    ],
)
def test_device_subscribe_is_refused_in_the_suback(
    broker: MosquittoServer, mqtt_connect: Connect, topic_filter: str
) -> None:
    device = Acks(mqtt_connect(_unique("dev-a"), "dev-a"))
    assert device.subscribe(topic_filter).value == NOT_AUTHORIZED
    assert not device.subscribe("millrace/v1/d/dev-a/receipt").is_failure


@pytest.mark.security
def test_mosquitto_sub_sees_the_same_suback_refusals(broker: MosquittoServer) -> None:
    cert, key = broker.pki.files("dev-a")
    base = [
        "mosquitto_sub", "-V", "5", "-h", broker.host, "-p", str(broker.port),
        "--cafile", str(broker.ca), "--cert", str(cert), "--key", str(key),
        "-i", _unique("dev-a"), "-E", "-d",
    ]  # fmt: skip
    for topic_filter, refused in (
        ("$share/ingest/millrace/v1/d/+/data", True),
        ("millrace/v1/#", True),
        ("millrace/v1/d/dev-a/cmd/+", False),
    ):
        done = subprocess.run(
            [*base, "-t", topic_filter], capture_output=True, text=True, timeout=WAIT_SECONDS
        )
        out = done.stdout + done.stderr
        assert "SUBACK" in out, out
        assert ("Subscribed (mid: 1): 135" in out) == refused, out  # 135: not authorized


@pytest.mark.security
def test_device_using_a_service_client_id_neither_kicks_it_nor_strands_data(
    broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = broker_factory(clientid_from_certificate=True)
    worker_cert = _unique("ingest")
    server.pki.issue(worker_cert, role="service")
    disconnects: list[Any] = []
    worker = mqtt_connect(worker_cert, worker_cert, server=server, clean_start=False)
    worker.on_disconnect = lambda *args: disconnects.append(args)
    inbox, acks = Inbox(worker), Acks(worker)
    assert not acks.subscribe("millrace/v1/d/+/data").is_failure

    # The device asks for the worker's client id and a persistent session ...
    thief = mqtt_connect(worker_cert, "dev-a", server=server, clean_start=False)
    thief_inbox = Inbox(thief)
    payload = _unique("data").encode()
    device = Acks(mqtt_connect(_unique("dev-b"), "dev-b", server=server))
    assert not device.publish("millrace/v1/d/dev-b/data", payload).is_failure
    inbox.wait_for(payload)  # ... the worker still has its session and gets the data,
    assert worker.is_connected() and disconnects == []
    assert thief.is_connected()  # ... and the device is connected as itself.
    assert payload not in thief_inbox.payloads
    assert "as dev-a (p5, c0" in server.log_text()  # connected under its own CN


# -- flow control and sessions (what ingest and edge rely on) --------------------------------


@pytest.mark.integration
def test_broker_lets_a_manual_ack_client_hold_max_inflight_messages(
    broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    """An ingest worker acking after commit can hold 1000 unacked batches, not mosquitto's 20."""
    server = broker_factory()
    received: list[int] = []
    cond = threading.Condition()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with cond:
            received.append(msg.mid)
            cond.notify_all()

    worker = mqtt_connect(
        _unique("svc"), "svc-test", server=server, manual_ack=True, on_message=on_message
    )
    assert not Acks(worker).subscribe("millrace/v1/d/+/data").is_failure
    device = mqtt_connect(_unique("dev-a"), "dev-a", server=server, max_inflight_messages=200)
    total = broker_config.MAX_INFLIGHT_MESSAGES + 200
    infos = [device.publish("millrace/v1/d/dev-a/data", b"w", qos=1) for _ in range(total)]
    for info in infos:
        info.wait_for_publish(WAIT_SECONDS)

    limit = broker_config.MAX_INFLIGHT_MESSAGES
    with cond:
        assert cond.wait_for(lambda: len(received) >= limit, WAIT_SECONDS), len(received)
        # A short quiet period: nothing beyond the window may follow without an ack.
        cond.wait_for(lambda: len(received) > limit, 0.5)
        assert len(received) == limit
        first = received[0]
    # Acks release the queued rest. (mosquitto 2.0.11 sends all of it after the first ack
    # instead of one per ack, so a worker must bound its own batches, not trust the window.)
    worker.ack(first, 1)
    with cond:
        assert cond.wait_for(lambda: len(received) == total, WAIT_SECONDS), len(received)


@pytest.mark.integration
def test_tls_client_resumes_a_persistent_session(
    broker: MosquittoServer, mqtt_connect: Connect
) -> None:
    client_id = _unique("svc-durable")
    first = mqtt_connect(client_id, "svc-test", clean_start=False)
    assert not Acks(first).subscribe("millrace/v1/d/dev-b/data").is_failure
    first.disconnect()
    first.loop_stop()

    payload = _unique("while-away").encode()
    device = Acks(mqtt_connect(_unique("dev-b"), "dev-b"))
    assert not device.publish("millrace/v1/d/dev-b/data", payload).is_failure

    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        arrived.set()

    mqtt_connect(client_id, "svc-test", clean_start=False, on_message=on_message)
    assert arrived.wait(WAIT_SECONDS)
    assert got == [payload]


def test_sync_plan_adds_deletes_and_fixes_a_changed_role_but_never_admin_rights() -> None:
    desired = json.loads(
        broker_config.render_dynsec(
            device_ids=["dev-a", "flip"], service_ids=["svc-a", "adm"], admin_ids=["adm"]
        )
    )

    def listed(name: str, *roles: str) -> dict[str, Any]:
        return {"username": name, "roles": [{"rolename": r} for r in roles]}

    current = [
        listed("dev-a", "device-dev-a"),  # as wanted
        listed("gone", "device-gone"),  # revoked
        listed("flip", "service"),  # revoked as a service, re-issued as a device
        listed("svc-a", "service", "broker-admin"),  # admin by an earlier config
        listed("adm", "service", "broker-admin"),
    ]
    commands, result = plan_commands(desired, current)
    assert (result.added, result.removed, result.changed) == ([], ["gone"], ["flip"])
    by_kind = [(c["command"], c.get("username") or c.get("rolename")) for c in commands]
    assert ("deleteClient", "gone") in by_kind and ("deleteRole", "device-gone") in by_kind
    assert ("modifyClient", "flip") in by_kind
    assert ("deleteRole", "device-flip") not in by_kind  # its new role stays
    assert not any(kind == "modifyClient" and who == "svc-a" for kind, who in by_kind)
    created = {c["rolename"] for c in commands if c["command"] == "createRole"}
    assert {"device-dev-a", "device-flip", "service", "broker-admin"} <= created


@pytest.mark.security
def test_sync_gives_an_id_reissued_in_the_other_role_only_its_new_rights(
    broker_factory: Callable[..., MosquittoServer], mqtt_connect: Connect
) -> None:
    server = broker_factory()
    ident = _unique("flip")
    server.pki.issue(ident, role="service")
    pki.revoke(server.pki.dir, ident)  # no sync in between: the broker still has it
    server.pki.issue(ident)  # a device now; the fixture syncs
    device = Acks(mqtt_connect(_unique(ident), ident, server=server))
    assert not device.publish(f"millrace/v1/d/{ident}/data", b"x").is_failure
    assert device.subscribe("millrace/v1/d/+/data").value == NOT_AUTHORIZED
    assert device.publish("millrace/v1/d/dev-a/cmd/ping", b"{}").value == NOT_AUTHORIZED
