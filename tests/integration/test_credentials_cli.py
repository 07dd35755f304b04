"""`pipeline-service credentials ...` (the real console script) with the local key file, and key rotation
(`rewrap`) with both KEKs: data keys are re-wrapped, ciphertexts are not touched."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path
from typing import Any

from server import app, meta
from server.credentials.store import CredentialStore
from server.kms.cloud import CloudKms
from server.localstack.emulator import Emulator
from server.providers import ProviderRegistry
from server.settings import Settings
from tests.conftest import KMS_KEY
from tests.fakes.kms import FakeKms
from tests.fakes.provider import FakeProvider, Reply
from tests.integration.cli_runner import run_cli

ADMIN_KEY = "sk-admin-" + uuid.uuid4().hex


async def rows(service: app.Service, meta_dataset: str, org: str) -> list[dict[str, Any]]:
    table = service.warehouse.table_ref(meta_dataset, "org_integration_credentials")
    return await service.warehouse.query(
        f"SELECT * FROM {table} WHERE org_slug = @org ORDER BY credential_name", {"org": org}
    )


async def test_credentials_cli_with_the_local_key_file(
    service: app.Service,
    settings: Settings,
    emulator: Emulator,
    fake_provider: FakeProvider,
    tmp_path: Path,
) -> None:
    meta_dataset = f"creds_{uuid.uuid4().hex[:8]}"
    kek_file = tmp_path / "state" / "kek.json"
    env = {
        "META_DATASET": meta_dataset,
        "KMS_KEY_NAME": "",  # the local environment's default: the key file
        "LOCAL_KEK_FILE": str(kek_file),
        "PROVIDER_BASE_URL_OPENAI": fake_provider.url,
    }

    async def cli(*args: str, stdin: bytes | None = None) -> tuple[int, Any]:
        code, out = await run_cli(settings, emulator, *args, stdin=stdin, **env)
        return code, json.loads(out)

    org = f"cli_{uuid.uuid4().hex[:8]}"
    assert (await cli("org", "create", org))[0] == 0
    document = tmp_path / "openai.json"
    document.write_text(json.dumps({"admin_api_key": ADMIN_KEY, "organization_id": "org-123"}))

    code, out = await cli("credentials", "set", org, "openai", "--from-file", str(document))
    assert code == 0, out
    stored = out["stored"]
    assert stored["provider"] == "openai" and stored["name"] == "default" and stored["version"] == 1
    assert stored["fingerprint"] == "..." + ADMIN_KEY[-4:] and stored["kek_version"].startswith("local:")
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    second = json.dumps({"admin_api_key": ADMIN_KEY + "2"}).encode()
    code, out = await cli(
        "credentials", "set", org, "openai", "--from-file", "-", "--name", "backup", stdin=second
    )
    assert code == 0 and out["stored"]["name"] == "backup"

    # Bad input: a clear error naming the problem, and nothing stored.
    code, out = await cli("credentials", "set", org, "opena1", "--from-file", str(document))
    assert code == 1 and out["error"] == "UNKNOWN_PROVIDER" and "opena1" in out["message"]
    code, out = await cli("credentials", "set", org, "anthropic", "--from-file", str(document))
    assert code == 1 and out["error"] == "INVALID_CREDENTIAL"
    assert {"field": "admin_api_key", "description": "does not have the expected format"} in out["violations"]
    assert ADMIN_KEY not in json.dumps(out)
    code, out = await cli(
        "credentials", "set", org, "openai", "--from-file", "-", stdin=b'{"admin_api_key": '
    )
    assert code == 1 and out["error"] == "INVALID_CREDENTIAL" and "line 1" in out["message"]
    code, out = await cli(
        "credentials", "set", org, "openai", "--from-file", "-", stdin=b'{"organization_id": "x"}'
    )
    assert code == 1 and {"field": "admin_api_key", "description": "required"} in out["violations"]
    code, out = await cli("credentials", "set", "no_such_org", "openai", "--from-file", str(document))
    assert code == 1 and out["error"] == "ORG_NOT_FOUND"

    code, out = await cli("credentials", "list", org)
    listed = out["credentials"]
    assert code == 0 and [(c["provider"], c["name"], c["status"]) for c in listed] == [
        ("openai", "backup", "ACTIVE"),
        ("openai", "default", "ACTIVE"),
    ]
    assert ADMIN_KEY not in json.dumps(out)

    # `test`: one cheap authenticated call; the outcome is recorded on the row.
    fake_provider.script(
        "/v1/organization/projects",
        lambda r: (
            Reply(200, {"data": []})
            if r.headers.get("Authorization") == f"Bearer {ADMIN_KEY}"
            else Reply(
                401, {"error": {"message": "Incorrect API key provided: " + r.headers["Authorization"][7:]}}
            )
        ),
    )
    code, out = await cli("credentials", "test", org, "openai")
    assert code == 0 and out["ok"] is True
    assert fake_provider.requests("/v1/organization/projects")[-1].query == {"limit": "1"}
    code, out = await cli("credentials", "test", org, "openai", "--name", "backup")
    assert code == 1 and out["ok"] is False and out["reason"] == "CREDENTIAL_REJECTED"
    assert ADMIN_KEY not in json.dumps(out) and "Incorrect API key provided: ***" in out["message"]
    statuses = {
        c["name"]: (c["status"], c["status_reason"])
        for c in (await cli("credentials", "list", org))[1]["credentials"]
    }
    assert statuses == {"default": ("VALID", None), "backup": ("REJECTED", "CREDENTIAL_REJECTED")}

    # Rotation: a new local key version; rewrap re-wraps the data keys and leaves the ciphertexts alone.
    before = await rows(service, meta_dataset, org)
    code, out = await cli("credentials", "rewrap", "--new-local-key")
    assert code == 0 and out["new_key_version"].endswith("/versions/2") and out["rewrapped"] == 2
    after = await rows(service, meta_dataset, org)
    assert [r["ciphertext"] for r in after] == [r["ciphertext"] for r in before]
    assert all(a["wrapped_data_key"] != b["wrapped_data_key"] for a, b in zip(after, before, strict=True))
    assert {r["kek_version"] for r in after} == {out["new_key_version"]}
    assert (await cli("credentials", "test", org, "openai"))[1]["ok"] is True  # still decrypts
    code, out = await cli("credentials", "rewrap")
    assert out == {"new_key_version": None, "rewrapped": 0, "unchanged": 2, "unreadable": []}

    code, out = await cli("credentials", "delete", org, before[0]["credential_id"])
    assert code == 0
    assert len((await cli("credentials", "list", org))[1]["credentials"]) == 1
    code, out = await cli("credentials", "delete", org, before[0]["credential_id"])
    assert code == 1 and out["error"] == "CREDENTIAL_NOT_FOUND"


async def test_rewrap_after_a_new_cloud_kms_key_version(
    service: app.Service, settings: Settings, fake_kms: FakeKms
) -> None:
    meta_dataset = f"rewrap_{uuid.uuid4().hex[:8]}"
    await meta.bootstrap(service.warehouse, meta_dataset, settings.schemas_dir)
    kms = CloudKms(KMS_KEY, endpoint=settings.kms_endpoint, insecure=True, timeout=1.0)
    store = CredentialStore(
        service.warehouse, meta_dataset, ProviderRegistry.load(settings.providers_file), kms
    )
    try:
        await store.set("acme", "openai", {"admin_api_key": ADMIN_KEY})
        await store.set("globex", "anthropic", {"admin_api_key": "sk-ant-admin-" + uuid.uuid4().hex})
        before = {
            r["credential_id"]: r
            for r in await service.warehouse.query(
                f"SELECT * FROM {meta_dataset}.org_integration_credentials"
            )
        }
        version = fake_kms.rotate(KMS_KEY)
        assert (await store.rewrap()) == {"rewrapped": 2, "unchanged": 0, "unreadable": []}
        after = await service.warehouse.query(f"SELECT * FROM {meta_dataset}.org_integration_credentials")
        for row in after:
            old = before[row["credential_id"]]
            assert (
                row["ciphertext"] == old["ciphertext"] and row["wrapped_data_key"] != old["wrapped_data_key"]
            )
            assert row["kek_version"] == f"{KMS_KEY}/cryptoKeyVersions/{version}" != old["kek_version"]
            assert row["rewrapped_at"] is not None
        credential = await store.load("acme", "openai")
        assert credential.secret("admin_api_key").get_secret_value() == ADMIN_KEY
        assert (await store.rewrap())["unchanged"] == 2
    finally:
        await kms.close()
