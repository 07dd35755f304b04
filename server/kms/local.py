"""The local key-encryption key: a git-ignored key file under `.state/`, mode 0600, made on first use.

File (JSON): `{"format": "cloudact-local-kek-v1", "primary": N, "versions": {"1": "<base64 32 bytes>", ...}}`.
A wrapped data key is `b"\\x01" + version (4 bytes, big-endian) + nonce (12) + AES-256-GCM(kek, nonce,
data_key, aad)`. `rotate()` adds a version and makes it primary (what a new Cloud KMS key version is);
`credentials rewrap` then re-wraps every data key with it. For the local environment only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.credentials.envelope import unreadable
from server.errors import FailedPreconditionError

FORMAT = "cloudact-local-kek-v1"


class LocalKeyFile:
    """A KEK with versions, kept in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[int, bytes] = {}
        self._primary = 0
        self._lock = asyncio.Lock()

    def _load_or_create(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._keys, self._primary = {1: AESGCM.generate_key(bit_length=256)}, 1
            self._write(create=True)
            return
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            raise FailedPreconditionError(
                f"{self.path} is readable by others (mode {mode:o}); chmod 600 it", reason="KEK_FILE_UNSAFE"
            )
        data: Any = orjson.loads(self.path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FailedPreconditionError(f"{self.path} is not a local key file", reason="KEK_FILE_INVALID")
        self._keys = {int(k): base64.b64decode(v) for k, v in data["versions"].items()}
        self._primary = int(data["primary"])

    def _write(self, *, create: bool = False) -> None:
        document = {
            "format": FORMAT,
            "primary": self._primary,
            "versions": {str(k): base64.b64encode(v).decode() for k, v in sorted(self._keys.items())},
        }
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(document))
        os.chmod(temporary, 0o600)
        if create and self.path.exists():  # another process made it first: keep theirs
            temporary.unlink()
            self._load_or_create()
            return
        os.replace(temporary, self.path)

    async def _ready(self) -> None:
        async with self._lock:
            if not self._keys:
                await asyncio.to_thread(self._load_or_create)

    def version_name(self, version: int) -> str:
        """The name recorded as `kek_version` for a version of this key."""
        return f"local:{self.path.name}/versions/{version}"

    async def wrap(self, data_key: bytes, aad: bytes) -> tuple[bytes, str]:
        """Wrap with the primary version."""
        await self._ready()
        nonce = os.urandom(12)
        sealed = AESGCM(self._keys[self._primary]).encrypt(nonce, data_key, aad)
        return b"\x01" + self._primary.to_bytes(4, "big") + nonce + sealed, self.version_name(self._primary)

    async def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Unwrap with the version the wrapped key names."""
        await self._ready()
        if len(wrapped) < 1 + 4 + 12 + 16 or wrapped[0] != 1:
            raise unreadable("data key")
        key = self._keys.get(int.from_bytes(wrapped[1:5], "big"))
        if key is None:
            raise unreadable("data key")
        try:
            return AESGCM(key).decrypt(wrapped[5:17], wrapped[17:], aad)
        except InvalidTag:
            raise unreadable("data key") from None

    async def rotate(self) -> str:
        """Add a new version and make it primary; return its name."""
        await self._ready()
        async with self._lock:
            self._primary = max(self._keys) + 1
            self._keys[self._primary] = AESGCM.generate_key(bit_length=256)
            await asyncio.to_thread(self._write)
        return self.version_name(self._primary)

    async def close(self) -> None:
        """Nothing to release."""
