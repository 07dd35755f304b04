"""The envelope format of a stored credential (version 1). Another service writes compatible rows this way.

    data_key        32 random bytes, one per credential and per `set` (AES-256-GCM key)
    aad             b"cloudact.credential.v1|" + org_slug + b"|" + provider + b"|" + credential_id  (UTF-8)
    plaintext       the credential's JSON object, UTF-8, keys sorted, no whitespace (any valid JSON object
                    of string fields is accepted on read)
    ciphertext      b"\\x01" + nonce (12 random bytes) + AES-256-GCM(data_key, nonce, plaintext, aad)
                    (ciphertext followed by the 16-byte tag, as `cryptography`'s AESGCM returns it)
    wrapped_key     the KEK's encryption of data_key with the same aad (Cloud KMS `Encrypt` with
                    `additional_authenticated_data=aad`; its ciphertext is opaque), and the KEK version that
                    wrapped it (`CryptoKeyVersion` name the Encrypt response gives)

The AAD binds both layers to the org, the provider and the credential id: a row copied to another org,
provider or id fails to decrypt (`CREDENTIAL_UNREADABLE`), as does any changed byte.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import TerminalError

FORMAT = 1
AAD_PREFIX = b"cloudact.credential.v1"
NONCE_BYTES = 12


def aad(org_slug: str, provider: str, credential_id: str) -> bytes:
    """The additional authenticated data binding a credential to its org, provider and id."""
    return b"|".join((AAD_PREFIX, org_slug.encode(), provider.encode(), credential_id.encode()))


def unreadable(what: str) -> TerminalError:
    """The one error of a credential that cannot be decrypted (no detail that could help an attacker)."""
    return TerminalError(f"{what}: the stored credential cannot be decrypted", reason="CREDENTIAL_UNREADABLE")


def new_data_key() -> bytes:
    """A fresh AES-256 data key."""
    return AESGCM.generate_key(bit_length=256)


def seal(fields: dict[str, str], data_key: bytes, associated: bytes) -> bytes:
    """Encrypt the credential's fields with its data key."""
    nonce = os.urandom(NONCE_BYTES)
    plaintext = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return bytes([FORMAT]) + nonce + AESGCM(data_key).encrypt(nonce, plaintext, associated)


def open_sealed(ciphertext: bytes, data_key: bytes, associated: bytes, what: str) -> dict[str, Any]:
    """Decrypt and parse; `CREDENTIAL_UNREADABLE` for a wrong key, a wrong AAD or a changed byte."""
    if len(data_key) != 32 or len(ciphertext) < 1 + NONCE_BYTES + 16 or ciphertext[0] != FORMAT:
        raise unreadable(what)
    nonce = ciphertext[1 : 1 + NONCE_BYTES]
    try:
        plaintext = AESGCM(data_key).decrypt(nonce, ciphertext[1 + NONCE_BYTES :], associated)
        fields = orjson.loads(plaintext)
    except (InvalidTag, orjson.JSONDecodeError):
        raise unreadable(what) from None
    if not isinstance(fields, dict):
        raise unreadable(what)
    return fields
