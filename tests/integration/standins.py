"""Stand-ins for the services we cannot run here, speaking their real protocols in the test process: an
SMTP server (aiosmtpd: STARTTLS with a self-signed certificate, AUTH LOGIN/PLAIN, a silent mode that
accepts TCP and never greets) and a Slack incoming-webhook receiver (aiohttp: scripted statuses and
delays)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp.pem", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    content: str
    tls: bool
    user: str


@dataclass
class SmtpServer:
    """An SMTP server requiring STARTTLS and AUTH (user `svc`, password `s3cret`)."""

    cert: Path
    key: Path
    user: str = "svc"
    password: str = "s3cret"
    received: list[Mail] = field(default_factory=list)
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        text = f"Subject: {parsed['Subject']}\n{parsed.get_content()}"  # type: ignore[attr-defined]
        self.received.append(
            Mail(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                text,
                session.ssl is not None,
                getattr(session, "auth_user", ""),
            )
        )
        return "250 OK"

    def _auth(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            self.user.encode(),
            self.password.encode(),
        )
        if ok:
            session.auth_user = self.user  # type: ignore[attr-defined]
        return AuthResult(success=ok, handled=False)

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)

        def factory() -> SMTP:
            return SMTP(
                self,
                tls_context=context,
                require_starttls=True,
                authenticator=self._auth,
                auth_required=True,
                hostname="localhost",
            )

        self._server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def silent_server() -> tuple[asyncio.base_events.Server, int]:
    """Accepts TCP connections and never says a word (an SMTP server that hangs)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@dataclass
class Webhook:
    """A Slack incoming-webhook receiver: answers the scripted statuses in turn (then 200)."""

    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    on_post: Callable[[], None] | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append(body)
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/services/T000/B000/XXXX", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/services/T000/B000/XXXX"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
