"""Key-encryption keys: the Cloud KMS adapter driven by the official async client against a fake KMS gRPC
server (tests/fakes/kms.py), the local key file, and the envelope format."""

from __future__ import annotations

import os
import pickle
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.credentials import envelope
from server.credentials.model import Credential
from server.errors import FailedPreconditionError, TerminalError, TransientError
from server.kms.cloud import CloudKms
from server.kms.local import LocalKeyFile
from tests.fakes.kms import FakeKms

KEY = "projects/test-project/locations/us/keyRings/ring/cryptoKeys/credentials"
AAD = envelope.aad("acme", "openai", "cred_1")


@pytest.fixture(scope="module")
async def fake_kms() -> AsyncIterator[FakeKms]:
    fake = FakeKms([KEY])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def kms(fake_kms: FakeKms) -> AsyncIterator[CloudKms]:
    fake_kms.down = fake_kms.corrupt_responses = False
    adapter = CloudKms(KEY, endpoint=f"127.0.0.1:{fake_kms.port}", insecure=True, timeout=1.0)
    yield adapter
    await adapter.close()


async def test_cloud_kms_round_trip_with_checksums(kms: CloudKms, fake_kms: FakeKms) -> None:
    data_key = envelope.new_data_key()
    fake_kms.calls.clear()
    wrapped, version = await kms.wrap(data_key, AAD)
    assert version.startswith(KEY + "/cryptoKeyVersions/")
    assert data_key not in wrapped
    assert await kms.unwrap(wrapped, AAD) == data_key
    assert fake_kms.calls == ["Encrypt", "Decrypt"]


async def test_cloud_kms_wrong_aad_and_tampering_are_unreadable(kms: CloudKms) -> None:
    wrapped, _ = await kms.wrap(envelope.new_data_key(), AAD)
    with pytest.raises(TerminalError) as other_org:
        await kms.unwrap(wrapped, envelope.aad("globex", "openai", "cred_1"))
    assert other_org.value.reason == "CREDENTIAL_UNREADABLE"
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(TerminalError) as changed:
        await kms.unwrap(tampered, AAD)
    assert changed.value.reason == "CREDENTIAL_UNREADABLE"


async def test_cloud_kms_outage_is_transient_and_bounded(kms: CloudKms, fake_kms: FakeKms) -> None:
    wrapped, _ = await kms.wrap(envelope.new_data_key(), AAD)
    fake_kms.down = True
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        await kms.unwrap(wrapped, AAD)
    assert caught.value.reason == "KMS_UNAVAILABLE"
    assert time.monotonic() - started < 5  # the retry deadline is the adapter's timeout, not a minute


async def test_cloud_kms_damaged_answers_are_caught_by_crc32c(kms: CloudKms, fake_kms: FakeKms) -> None:
    data_key = envelope.new_data_key()
    wrapped, _ = await kms.wrap(data_key, AAD)
    fake_kms.corrupt_responses = True
    with pytest.raises(TransientError, match="damaged in transit"):
        await kms.unwrap(wrapped, AAD)
    with pytest.raises(TransientError, match="damaged in transit"):
        await kms.wrap(data_key, AAD)


async def test_cloud_kms_unknown_key_is_rejected(fake_kms: FakeKms) -> None:
    adapter = CloudKms(KEY + "-missing", endpoint=f"127.0.0.1:{fake_kms.port}", insecure=True, timeout=1.0)
    with pytest.raises(TerminalError) as caught:
        await adapter.wrap(envelope.new_data_key(), AAD)
    assert caught.value.reason == "KMS_KEY_REJECTED"
    await adapter.close()


async def test_cloud_kms_new_version_wraps_and_old_ones_still_unwrap(
    kms: CloudKms, fake_kms: FakeKms
) -> None:
    data_key = envelope.new_data_key()
    old, old_version = await kms.wrap(data_key, AAD)
    fake_kms.rotate(KEY)
    new, new_version = await kms.wrap(data_key, AAD)
    assert new_version != old_version and new_version.endswith(f"/cryptoKeyVersions/{fake_kms.primary[KEY]}")
    assert await kms.unwrap(old, AAD) == data_key == await kms.unwrap(new, AAD)


async def test_local_key_file_is_created_0600_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "state" / "kek.json"
    kek = LocalKeyFile(path)
    data_key = envelope.new_data_key()
    wrapped, version = await kek.wrap(data_key, AAD)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert version == "local:kek.json/versions/1"
    again = LocalKeyFile(path)  # another process reads the same file
    assert await again.unwrap(wrapped, AAD) == data_key
    assert await again.rotate() == "local:kek.json/versions/2"
    rewrapped, version2 = await again.wrap(data_key, AAD)
    assert version2.endswith("/2") and await LocalKeyFile(path).unwrap(wrapped, AAD) == data_key
    assert await LocalKeyFile(path).unwrap(rewrapped, AAD) == data_key
    with pytest.raises(TerminalError) as caught:
        await kek.unwrap(wrapped, envelope.aad("globex", "openai", "cred_1"))
    assert caught.value.reason == "CREDENTIAL_UNREADABLE"
    os.chmod(path, 0o644)
    with pytest.raises(FailedPreconditionError) as unsafe:
        await LocalKeyFile(path).wrap(data_key, AAD)
    assert unsafe.value.reason == "KEK_FILE_UNSAFE"


def test_envelope_binds_org_provider_and_id() -> None:
    data_key = envelope.new_data_key()
    sealed = envelope.seal({"admin_api_key": "sk-admin-123456789"}, data_key, AAD)
    assert sealed[0] == 1 and b"sk-admin" not in sealed
    assert envelope.open_sealed(sealed, data_key, AAD, "x") == {"admin_api_key": "sk-admin-123456789"}
    for other in (
        envelope.aad("globex", "openai", "cred_1"),
        envelope.aad("acme", "anthropic", "cred_1"),
        envelope.aad("acme", "openai", "cred_2"),
    ):
        with pytest.raises(TerminalError, match="cannot be decrypted"):
            envelope.open_sealed(sealed, data_key, other, "x")
    for index in (0, 5, len(sealed) - 1):  # format byte, nonce, tag
        changed = bytearray(sealed)
        changed[index] ^= 0x01
        with pytest.raises(TerminalError):
            envelope.open_sealed(bytes(changed), data_key, AAD, "x")
    with pytest.raises(TerminalError):
        envelope.open_sealed(sealed, envelope.new_data_key(), AAD, "x")


def test_credential_never_shows_its_secret() -> None:
    secret = "sk-admin-" + "q" * 40
    credential = Credential(
        id="cred_1",
        org_slug="acme",
        provider="openai",
        name="default",
        version=3,
        fields={"admin_api_key": secret, "organization_id": "org-1"},
        secret_fields=frozenset({"admin_api_key"}),
    )
    for text in (
        repr(credential),
        str(credential),
        f"{credential}",
        repr(credential.secret("admin_api_key")),
    ):
        assert secret not in text
    assert credential.secret("admin_api_key").get_secret_value() == secret
    assert credential.value("organization_id") == "org-1"
    with pytest.raises(KeyError):
        credential.value("admin_api_key")
    with pytest.raises(TypeError):
        pickle.dumps(credential)
