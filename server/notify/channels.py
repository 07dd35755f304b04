"""The two channels: e-mail over SMTP (aiosmtplib; STARTTLS, implicit TLS or none; AUTH when a username is
set) and Slack incoming webhooks (a JSON POST). Each `send` raises `DeliveryError` with a short reason of
our own words (never the server's reply or the webhook URL)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from email.message import EmailMessage

import aiohttp
import aiosmtplib

from server.notify.config import EmailConfig, SlackConfig


class DeliveryError(Exception):
    """A message was not delivered; `reason` is stable (SMTP_AUTH_FAILED, ...), `transient` says whether
    another attempt may succeed."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True, slots=True)
class Message:
    """What is said, whatever the channel."""

    subject: str
    text: str


class EmailChannel:
    """Sends through one SMTP server."""

    def __init__(self, config: EmailConfig) -> None:
        self._c = config
        self._tls: ssl.SSLContext | None = None
        if config.security != "none":
            self._tls = ssl.create_default_context(cafile=config.ca_file or None)

    async def send(self, recipients: list[str], message: Message) -> None:
        """One e-mail to `recipients`."""
        c = self._c
        mail = EmailMessage()
        mail["From"] = c.sender
        mail["To"] = ", ".join(recipients)
        mail["Subject"] = message.subject
        mail.set_content(message.text)
        try:
            await aiosmtplib.send(
                mail,
                hostname=c.smtp_host,
                port=c.smtp_port,
                username=c.username or None,
                password=c.password or None,
                use_tls=c.security == "tls",
                start_tls=c.security == "starttls",
                tls_context=self._tls,
                timeout=c.timeout_seconds,
            )
        except aiosmtplib.SMTPAuthenticationError:
            raise DeliveryError("SMTP_AUTH_FAILED", transient=False) from None
        except aiosmtplib.SMTPRecipientsRefused:
            raise DeliveryError("SMTP_RECIPIENTS_REFUSED", transient=False) from None
        except aiosmtplib.SMTPConnectTimeoutError:
            raise DeliveryError("SMTP_TIMEOUT", transient=True) from None
        except aiosmtplib.SMTPTimeoutError:
            raise DeliveryError("SMTP_TIMEOUT", transient=True) from None
        except (aiosmtplib.SMTPConnectError, ConnectionError, OSError):
            raise DeliveryError("SMTP_UNREACHABLE", transient=True) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(
                f"SMTP_REFUSED_{exc.code}", transient=exc.code >= 400 and exc.code < 500
            ) from None
        except aiosmtplib.SMTPException:
            raise DeliveryError("SMTP_ERROR", transient=True) from None


class SlackChannel:
    """Posts to an org's incoming webhook."""

    def __init__(self, config: SlackConfig, session: aiohttp.ClientSession) -> None:
        self._c = config
        self._session = session

    async def send(self, webhook_url: str, message: Message) -> None:
        """One message to the webhook."""
        try:
            async with self._session.post(
                webhook_url,
                json={"text": f"*{message.subject}*\n{message.text}"},
                timeout=aiohttp.ClientTimeout(total=self._c.timeout_seconds),
                allow_redirects=False,
            ) as response:
                if response.status == 429 or response.status >= 500:
                    raise DeliveryError(f"SLACK_HTTP_{response.status}", transient=True)
                if response.status >= 300:
                    raise DeliveryError(f"SLACK_HTTP_{response.status}", transient=False)
        except TimeoutError:
            raise DeliveryError("SLACK_TIMEOUT", transient=True) from None
        except aiohttp.ClientError:
            raise DeliveryError("SLACK_UNREACHABLE", transient=True) from None
