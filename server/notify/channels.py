"""E-mail over SMTP (aiosmtplib; STARTTLS, implicit TLS or none; AUTH when a username is set), and what
every channel shares: the message and `DeliveryError`, whose short reason is our own words (never the
server's reply or the webhook URL). Slack goes through `server.notify.webhooks`."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from server.notify.config import EmailConfig


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
