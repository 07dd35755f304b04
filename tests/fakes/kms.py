"""A fake Cloud KMS: `google.cloud.kms.v1.KeyManagementService` Encrypt/Decrypt over grpc.aio.

Speaks the real protocol (the request/response messages shipped in `google-cloud-kms`), so the official
async client drives it unmodified. Per CryptoKey it keeps AES-256-GCM versions; Encrypt uses the primary
version and answers its `cryptoKeyVersions/N` name, CRC32C fields are checked and filled as Cloud KMS
documents. Failure modes: `down` (UNAVAILABLE), `corrupt_responses` (wrong checksums in answers); a bad
ciphertext or AAD is INVALID_ARGUMENT, an unknown key NOT_FOUND. Binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
from typing import Any

import google_crc32c
import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud import kms_v1
from grpc import aio

SERVICE = "google.cloud.kms.v1.KeyManagementService"


def crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


class FakeKms:
    def __init__(self, keys: list[str]) -> None:
        self.versions: dict[str, dict[int, bytes]] = {
            k: {1: AESGCM.generate_key(bit_length=256)} for k in keys
        }
        self.primary: dict[str, int] = dict.fromkeys(keys, 1)
        self.down = False
        self.corrupt_responses = False
        self.calls: list[str] = []
        self._server: aio.Server | None = None
        self.port = 0

    def rotate(self, key: str) -> int:
        version = max(self.versions[key]) + 1
        self.versions[key][version] = AESGCM.generate_key(bit_length=256)
        self.primary[key] = version
        return version

    async def _check(self, context: Any, name: str) -> None:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the service is currently unavailable")
        if name not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{name} not found")

    async def encrypt(self, request: kms_v1.EncryptRequest, context: Any) -> kms_v1.EncryptResponse:
        self.calls.append("Encrypt")
        await self._check(context, request.name)
        if request.plaintext_crc32c is not None and request.plaintext_crc32c != crc(request.plaintext):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "plaintext_crc32c mismatch")
        aad = request.additional_authenticated_data
        if request.additional_authenticated_data_crc32c is not None and (
            request.additional_authenticated_data_crc32c != crc(aad)
        ):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "aad crc32c mismatch")
        version = self.primary[request.name]
        nonce = os.urandom(12)
        sealed = AESGCM(self.versions[request.name][version]).encrypt(nonce, request.plaintext, aad or None)
        ciphertext = b"fk" + version.to_bytes(2, "big") + nonce + sealed
        return kms_v1.EncryptResponse(
            name=f"{request.name}/cryptoKeyVersions/{version}",
            ciphertext=ciphertext,
            ciphertext_crc32c=crc(ciphertext) + (1 if self.corrupt_responses else 0),
            verified_plaintext_crc32c=request.plaintext_crc32c is not None,
            verified_additional_authenticated_data_crc32c=request.additional_authenticated_data_crc32c
            is not None,
            protection_level=kms_v1.ProtectionLevel.SOFTWARE,
        )

    async def decrypt(self, request: kms_v1.DecryptRequest, context: Any) -> kms_v1.DecryptResponse:
        self.calls.append("Decrypt")
        await self._check(context, request.name)
        ciphertext = request.ciphertext
        if request.ciphertext_crc32c is not None and request.ciphertext_crc32c != crc(ciphertext):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ciphertext_crc32c mismatch")
        key = self.versions[request.name].get(int.from_bytes(ciphertext[2:4], "big"))
        try:
            if key is None or ciphertext[:2] != b"fk":
                raise InvalidTag
            plaintext = AESGCM(key).decrypt(
                ciphertext[4:16], ciphertext[16:], request.additional_authenticated_data or None
            )
        except InvalidTag:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
            )
        return kms_v1.DecryptResponse(
            plaintext=plaintext,
            plaintext_crc32c=crc(plaintext) + (1 if self.corrupt_responses else 0),
            used_primary=int.from_bytes(ciphertext[2:4], "big") == self.primary[request.name],
            protection_level=kms_v1.ProtectionLevel.SOFTWARE,
        )

    async def start(self) -> int:
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Encrypt": grpc.unary_unary_rpc_method_handler(
                    self.encrypt,
                    request_deserializer=kms_v1.EncryptRequest.deserialize,
                    response_serializer=kms_v1.EncryptResponse.serialize,
                ),
                "Decrypt": grpc.unary_unary_rpc_method_handler(
                    self.decrypt,
                    request_deserializer=kms_v1.DecryptRequest.deserialize,
                    response_serializer=kms_v1.DecryptResponse.serialize,
                ),
            },
        )
        self._server = aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
