"""Key-encryption keys (KEK) that wrap credential data keys: Cloud KMS in stage/prod (`cloud.py`, the only
importer of `google.cloud.kms`), a local key file locally (`local.py`). Both wrap with the credential's AAD.

Errors: a wrapped key that does not unwrap (changed bytes, another AAD, another key) is TerminalError
`CREDENTIAL_UNREADABLE`; KMS unreachable or failing is TransientError `KMS_UNAVAILABLE`; a key KMS refuses
(not found, no permission, disabled) is TerminalError `KMS_KEY_REJECTED`.
"""

from __future__ import annotations

from typing import Protocol


class KeyEncryptionKey(Protocol):
    """Wraps and unwraps data keys."""

    async def wrap(self, data_key: bytes, aad: bytes) -> tuple[bytes, str]:
        """Encrypt a data key with the current primary version; return (wrapped key, version name)."""
        ...

    async def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key (any version)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
