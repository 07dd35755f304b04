"""An org's Slack incoming webhook: kept as an encrypted credential (provider `slack` of
`configs/system/providers.yml`, name `notifications`; the credential store's envelope encryption under
the KEK) and posted to through the one outbound HTTP client (its retries with backoff, limits, redaction
of the URL, which is the secret). The notification settings keep only the credential's id."""

from __future__ import annotations

import contextlib

from server.credentials.vault import CredentialVault
from server.errors import NotFoundError, ServiceError
from server.http.client import OutboundHttp
from server.notify.channels import DeliveryError, Message

PROVIDER = "slack"
NAME = "notifications"


class SlackWebhooks:
    """Stores, checks and posts to orgs' webhooks."""

    def __init__(self, vault: CredentialVault, http: OutboundHttp) -> None:
        self._vault = vault
        self._http = http

    def allowed(self, url: str) -> bool:
        """Whether `url` is a webhook the service would post to: http(s) on the `slack` provider's
        scheme and host (https://hooks.slack.com unless PROVIDER_BASE_URL_SLACK says otherwise), no user
        info, no whitespace, of the credential's shape."""
        if any(c.isspace() for c in url) or "@" in url.split("/services/")[0]:
            return False
        try:
            OutboundHttp.url(self._http.registry.get(PROVIDER), url)
            self._vault.store.registry.validate_credential(PROVIDER, {"webhook_url": url})
        except ServiceError:
            return False
        return True

    async def put(self, org_slug: str, url: str) -> str:
        """Encrypt and store the org's URL (replacing the previous one); the credential's id."""
        stored = await self._vault.store.set(org_slug, PROVIDER, {"webhook_url": url}, NAME)
        self._vault.forget(org_slug)  # this replica posts to the new URL at once (others within the TTL)
        return stored.credential_id

    async def delete(self, org_slug: str, reference: str) -> None:
        """Forget the org's webhook."""
        with contextlib.suppress(NotFoundError):
            await self._vault.store.delete(org_slug, reference)
        self._vault.forget(org_slug)

    async def post(self, org_slug: str, message: Message) -> None:
        """Post `message` to the org's webhook; DeliveryError (`SLACK_<reason>`) when it did not arrive
        after the HTTP client's own retries."""
        try:
            credential = await self._vault.get(org_slug, PROVIDER, NAME)
            await self._http.bind(org_slug).request(
                PROVIDER,
                "POST",
                credential.secret("webhook_url").get_secret_value(),
                json={"text": f"*{message.subject}*\n{message.text}"},
                credential=credential,
            )
        except ServiceError as exc:
            raise DeliveryError(f"SLACK_{exc.reason}", transient=False) from None
