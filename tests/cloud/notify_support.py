"""Loopback receivers for notification tests: an HTTP webhook receiver that checks the
HMAC signature itself, and an SMTP server (aiosmtpd) that requires STARTTLS and login.

Both record only what they accepted; `fail` makes them refuse (HTTP 503, SMTP 451),
`hold` makes the webhook receiver keep a request open until released.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.fixtures.fix_broker import free_port

SECRET = b"0123456789abcdef-test-webhook-secret"
SMTP_USER = "millrace-notify"
SMTP_PASSWORD = "s3cret-for-tests"


@dataclass
class Hook:
    delivery_id: str
    idempotency_key: str
    body: dict[str, Any]


@dataclass
class WebhookReceiver:
    """http.server on 127.0.0.1 in a thread; verifies signature and timestamp itself."""

    secret: bytes = SECRET
    fail: bool = False
    hold: threading.Event | None = None
    accepted: list[Hook] = field(default_factory=list)
    attempts: int = 0
    bad_signatures: int = 0
    in_flight: int = 0

    def __post_init__(self) -> None:
        receiver = self
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.attempts += 1
                    receiver.in_flight += 1
                try:
                    if receiver.hold is not None:
                        receiver.hold.wait(60)
                    ts = self.headers.get("X-Millrace-Timestamp", "")
                    mac = hmac.new(receiver.secret, ts.encode() + b"." + body, hashlib.sha256)
                    good = hmac.compare_digest(
                        "sha256=" + mac.hexdigest(), self.headers.get("X-Millrace-Signature", "")
                    )
                    fresh = ts.isdigit() and abs(time.time() - int(ts)) < 300
                    if not (good and fresh):
                        with receiver._lock:
                            receiver.bad_signatures += 1
                        self.send_response(401)
                    elif receiver.fail:
                        self.send_response(503)
                    else:
                        with receiver._lock:
                            receiver.accepted.append(
                                Hook(
                                    self.headers["X-Millrace-Delivery"],
                                    self.headers["Idempotency-Key"],
                                    json.loads(body),
                                )
                            )
                        self.send_response(204)
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: Message
    authenticated: bool


class SmtpReceiver:
    """aiosmtpd on 127.0.0.1 with the test PKI's broker certificate; STARTTLS required."""

    def __init__(self, cert: Path, key: Path) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.fail = False
        self.accepted: list[Mail] = []
        self.attempts = 0
        receiver = self

        class Handler:
            async def handle_DATA(self, _server: Any, session: Any, envelope: Any) -> str:
                receiver.attempts += 1
                if receiver.fail:
                    return "451 4.3.0 try again later"
                receiver.accepted.append(
                    Mail(
                        envelope.mail_from,
                        list(envelope.rcpt_tos),
                        message_from_bytes(envelope.content),
                        bool(session.authenticated),
                    )
                )
                return "250 OK"

        def authenticator(
            _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
        ) -> Any:
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
                SMTP_USER.encode(),
                SMTP_PASSWORD.encode(),
            )
            return AuthResult(success=ok)

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.port = free_port()
        self.controller = Controller(
            Handler(),
            hostname="127.0.0.1",
            port=self.port,
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            authenticator=authenticator,
        )
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


def write_secret(path: Path, data: str, mode: int = 0o600) -> Path:
    path.touch(mode=mode)
    path.chmod(mode)
    path.write_text(data, encoding="utf-8")
    return path


def notify_toml(
    tmp_path: Path,
    *,
    webhook: WebhookReceiver | None,
    smtp: SmtpReceiver | None,
    ca: Path,
    extra: str = "",
    webhook_timeout_s: float = 5.0,
) -> str:
    """A `[notify]` section routing every transition to the given receivers."""
    secret = write_secret(tmp_path / "webhook.secret", SECRET.decode())
    creds = write_secret(
        tmp_path / "smtp.secret", f'username = "{SMTP_USER}"\npassword = "{SMTP_PASSWORD}"\n'
    )
    channels = []
    text = f"""
[notify]
dashboard_url = "https://dash.plant.example"
backoff_initial_s = 0.2
backoff_max_s = 1.0
poll_s = 0.2
{extra}
"""
    if webhook is not None:
        channels.append('"hook"')
        text += f"""
[notify.channels.hook]
type = "webhook"
url = "{webhook.url}"
secret_file = "{secret}"
timeout_s = {webhook_timeout_s}
"""
    if smtp is not None:
        channels.append('"mail"')
        text += f"""
[notify.channels.mail]
type = "email"
host = "127.0.0.1"
port = {smtp.port}
from = "millrace@plant.example"
to = ["oncall@plant.example"]
credentials_file = "{creds}"
ca = "{ca}"
timeout_s = 10
"""
    text += f"""
[[notify.route]]
channels = [{", ".join(channels)}]
"""
    return text
