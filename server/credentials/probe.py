"""`credentials test`: one cheap authenticated call per provider (the registry's `test` entry)."""

from __future__ import annotations

import string
from typing import Any

from server.credentials.store import CredentialStore
from server.errors import FailedPreconditionError, ServiceError
from server.http.client import OutboundHttp


async def probe(
    store: CredentialStore, http: OutboundHttp, org_slug: str, provider: str, name: str
) -> dict[str, Any]:
    """Decrypt the credential, make the provider's test call, record and return the outcome.

    The outcome is `{"ok": true}` or `{"ok": false, "reason": ..., "message": ...}` (the provider's reason,
    secrets masked); decryption failures are raised, not recorded.
    """
    spec = store.registry.get(provider)
    if spec.test is None:
        raise FailedPreconditionError(f"{provider} has no test call in the registry", reason="NO_TEST_CALL")
    credential = await store.load(org_slug, provider, name)
    public = {k: v for k, v in credential.reveal().items() if k not in spec.credential_spec.secret_fields}
    fields = {f for _, f, _, _ in string.Formatter().parse(spec.test.path) if f}
    path = spec.test.path.format(**{f: public.get(f, "") for f in fields})
    try:
        await http.bind(org_slug).request(
            provider, spec.test.method, path, params=spec.test.params, credential=credential
        )
    except ServiceError as exc:
        await store.record_test(org_slug, credential.id, exc.reason)
        return {"ok": False, "credential_id": credential.id, "reason": exc.reason, "message": exc.message}
    await store.record_test(org_slug, credential.id, None)
    return {"ok": True, "credential_id": credential.id}
