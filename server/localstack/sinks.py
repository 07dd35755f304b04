"""Local stand-ins for the notification channels (`make run`): an SMTP sink (aiosmtpd, plain SMTP, no
auth) and a Slack incoming-webhook receiver (aiohttp), both on 127.0.0.1. Each message received is logged
and written to `.state/notifications/` (`mail-<time>-N.txt`, `slack-<time>-N.json`), so a failing run's
e-mail and Slack message can be read there."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from pathlib import Path

from aiohttp.web import Application, AppRunner, Request, Response, TCPSite
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger(__name__)
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command at INFO

WEBHOOK_PATH = "/services/local/demo/webhook"


class _Mailbox:
    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._n = count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        message = email.message_from_bytes(content, policy=email.policy.default)
        path = self._folder / f"mail-{time.strftime('%Y%m%dT%H%M%S')}-{next(self._n)}.txt"
        body = message.get_body(("plain",))
        text = body.get_content() if body is not None else ""
        note = f"To: {', '.join(envelope.rcpt_tos)}\nSubject: {message['Subject']}\n\n{text}"
        await asyncio.to_thread(path.write_text, note)
        log.info("SMTP sink received %r for %s (%s)", message["Subject"], envelope.rcpt_tos, path)
        return "250 OK"


@asynccontextmanager
async def embedded(folder: Path, smtp_port: int, webhook_port: int) -> AsyncIterator[str]:
    """Run both sinks for the block; yields the webhook URL."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    mailbox = _Mailbox(folder)
    smtp = await asyncio.get_running_loop().create_server(lambda: SMTP(mailbox), "127.0.0.1", smtp_port)
    posts = count(1)

    async def receive(request: Request) -> Response:
        body = await request.json()
        path = folder / f"slack-{time.strftime('%Y%m%dT%H%M%S')}-{next(posts)}.json"
        await asyncio.to_thread(path.write_text, json.dumps(body, indent=2))
        log.info("Slack sink received a message (%s)", path)
        return Response(text="ok")

    app = Application()
    app.router.add_post(WEBHOOK_PATH, receive)
    runner = AppRunner(app)
    await runner.setup()
    await TCPSite(runner, "127.0.0.1", webhook_port).start()
    try:
        yield f"http://127.0.0.1:{webhook_port}{WEBHOOK_PATH}"
    finally:
        await runner.cleanup()
        smtp.close()
        await smtp.wait_closed()
