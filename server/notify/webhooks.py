"""Where an org's Slack webhook URL is kept. The URL is a secret (whoever has it can post to the org's
channel): the settings row holds only a reference, `Webhooks` turns it back into the URL.

`InlineWebhooks` is the interim keeper until the credential store (issue-8: envelope encryption with
Cloud KMS) is on this branch: its reference *is* the URL, stored in PostgreSQL as it is. The notifier
and the RPC only see the `Webhooks` protocol, so the switch is one class.
"""

from __future__ import annotations

from typing import Protocol


class Webhooks(Protocol):
    """Stores an org's webhook URL and finds it again."""

    async def put(self, org_slug: str, url: str) -> str:
        """Keep the org's URL; the reference to store in the settings."""
        ...

    async def get(self, org_slug: str, reference: str) -> str:
        """The URL of a reference ("" if there is none)."""
        ...


class InlineWebhooks:
    """The reference is the URL itself (interim; see the module docstring)."""

    async def put(self, org_slug: str, url: str) -> str:
        """The URL is its own reference."""
        return url

    async def get(self, org_slug: str, reference: str) -> str:
        """The URL is its own reference."""
        return reference
