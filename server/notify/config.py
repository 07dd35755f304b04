"""The global notification settings, `configs/notifications/config.json`, with `${ENV_VAR}` expansion.

Values may name environment variables (`"${SMTP_PASSWORD}"`, also inside a longer string). They are
expanded at start; a variable that is not set is a start error naming it and the field, unless the
field belongs to a disabled channel (or notifications are disabled as a whole: a valid setting).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Event = Literal["RUN_FAILED", "RUN_TIMED_OUT", "RUN_RECOVERED", "QUOTA_EXCEEDED"]
EVENTS: tuple[Event, ...] = ("RUN_FAILED", "RUN_TIMED_OUT", "RUN_RECOVERED", "QUOTA_EXCEEDED")
_VAR = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class NotificationConfigError(ValueError):
    """The config cannot be used; the message names the file, the field and the variable."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmailConfig(_Strict):
    """SMTP delivery (aiosmtplib)."""

    enabled: bool = True
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: str = ""
    sender: str
    default_recipients: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    ca_file: str = ""  # verify the server's certificate against this bundle (else the system's)


class SlackConfig(_Strict):
    """Slack incoming webhooks (the org's URL is a credential of the org; timeouts and retries are the
    outbound HTTP client's)."""

    enabled: bool = True


class NotificationConfig(_Strict):
    """Global defaults; orgs set recipients, their webhook, events and cooldown by RPC."""

    enabled: bool = False
    email: EmailConfig | None = None
    slack: SlackConfig = SlackConfig()
    events: list[Event] = Field(default_factory=lambda: list(EVENTS))
    cooldown_seconds: int = Field(3600, ge=0, le=7 * 86400)
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_seconds: float = Field(2.0, ge=0, le=300)
    rest_base_url: str = "http://127.0.0.1:8001"
    grpc_address: str = "127.0.0.1:50051"

    @property
    def email_on(self) -> bool:
        """Whether e-mail is sent."""
        return self.enabled and self.email is not None and self.email.enabled

    @property
    def slack_on(self) -> bool:
        """Whether Slack messages are sent."""
        return self.enabled and self.slack.enabled


def _expand(value: Any, env: Mapping[str, str], path: str, missing: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                missing.append((path, m.group(1)))
                return ""
            return env[m.group(1)]

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand(v, env, f"{path}.{k}" if path else k, missing) for k, v in value.items()}
    return value


def _channel_enabled(raw: Mapping[str, Any], field: str) -> bool:
    if not raw.get("enabled", False):
        return False
    channel = field.split(".")[0].split("[")[0]
    section = raw.get(channel)
    return not (isinstance(section, dict) and section.get("enabled") is False)


def load(path: Path, env: Mapping[str, str]) -> NotificationConfig:
    """Read, expand and validate the config; a missing file means notifications are off."""
    if not path.exists():
        return NotificationConfig()
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise NotificationConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise NotificationConfigError(f"{path}: an object is expected")
    missing: list[tuple[str, str]] = []
    expanded = _expand(raw, env, "", missing)
    needed = [(field, var) for field, var in missing if _channel_enabled(raw, field)]
    if needed:
        names = ", ".join(f"{var} (for {field})" for field, var in needed)
        raise NotificationConfigError(f"{path}: environment variables not set: {names}")
    try:
        config = NotificationConfig.model_validate(expanded)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise NotificationConfigError(f"{path}: {where}: {first['msg']}") from None
    if config.email_on:
        assert config.email is not None
        recipients = [r for r in config.email.default_recipients if r]
        bad = [r for r in recipients if "@" not in r]
        if bad:
            raise NotificationConfigError(f"{path}: email.default_recipients: not an e-mail address")
        config = config.model_copy(
            update={"email": config.email.model_copy(update={"default_recipients": recipients})}
        )
    return config
