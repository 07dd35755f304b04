"""Cloud KMS as the key-encryption key: the only module that imports `google.cloud.kms`.

Every call carries and checks CRC32C checksums as Google documents for data integrity: Encrypt sends
`plaintext_crc32c` and `additional_authenticated_data_crc32c`, requires `verified_*` in the answer and
checks `ciphertext_crc32c`; Decrypt sends `ciphertext_crc32c` and the AAD's, and checks
`plaintext_crc32c`. A mismatch is a transient error (the bytes were damaged in transit; retry).

Decrypt names the CryptoKey (KMS finds the version in the ciphertext); Encrypt uses the primary version
and returns its name, which is recorded as the row's `kek_version`. The async client is the official
one; `endpoint` overrides the API endpoint (client_options), `insecure` speaks plaintext gRPC to it (the
tests' fake KMS only; refused outside the local environment by the settings).
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry_async
from google.api_core.client_options import ClientOptions
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcAsyncIOTransport,
)

from server.credentials.envelope import unreadable
from server.errors import TerminalError, TransientError

_TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.InternalServerError,
    gexc.TooManyRequests,
    gexc.Aborted,
    gexc.Unknown,
)


def crc32c(data: bytes) -> int:
    """CRC32C as KMS computes it."""
    return int(google_crc32c.value(data))


def _insecure_transport(**kwargs: Any) -> KeyManagementServiceGrpcAsyncIOTransport:
    host = kwargs["host"]
    return KeyManagementServiceGrpcAsyncIOTransport(host=host, channel=grpc.aio.insecure_channel(host))


class CloudKms:
    """Wraps data keys with one Cloud KMS CryptoKey."""

    def __init__(self, key_name: str, *, endpoint: str = "", insecure: bool = False, timeout: float = 10.0):
        self.key_name = key_name
        self._endpoint = endpoint
        self._insecure = insecure
        self._timeout = timeout
        self._retry = retry_async.AsyncRetry(
            predicate=retry_async.if_exception_type(*_TRANSIENT),
            initial=0.1,
            maximum=2.0,
            multiplier=2.0,
            timeout=timeout,
        )
        self._client: kms_v1.KeyManagementServiceAsyncClient | None = None

    def _kms(self) -> kms_v1.KeyManagementServiceAsyncClient:
        if self._client is None:  # built in the running loop (grpc.aio channels belong to one loop)
            options = ClientOptions(api_endpoint=self._endpoint) if self._endpoint else None
            self._client = kms_v1.KeyManagementServiceAsyncClient(
                client_options=options, transport=_insecure_transport if self._insecure else "grpc_asyncio"
            )
        return self._client

    async def _call(self, method: str, request: dict[str, Any]) -> Any:
        try:
            return await getattr(self._kms(), method)(
                request=request, retry=self._retry, timeout=self._timeout
            )
        except gexc.InvalidArgument:
            raise unreadable("data key") from None
        except (*_TRANSIENT, gexc.RetryError) as exc:
            raise TransientError(
                f"KMS {method} failed ({type(exc).__name__})", reason="KMS_UNAVAILABLE"
            ) from None
        except gexc.GoogleAPICallError as exc:
            raise TerminalError(
                f"KMS {method} refused the key ({type(exc).__name__})", reason="KMS_KEY_REJECTED"
            ) from None

    async def wrap(self, data_key: bytes, aad: bytes) -> tuple[bytes, str]:
        """Encrypt a data key with the key's primary version."""
        response = await self._call(
            "encrypt",
            {
                "name": self.key_name,
                "plaintext": data_key,
                "plaintext_crc32c": crc32c(data_key),
                "additional_authenticated_data": aad,
                "additional_authenticated_data_crc32c": crc32c(aad),
            },
        )
        if (
            not response.verified_plaintext_crc32c
            or not response.verified_additional_authenticated_data_crc32c
        ):
            raise TransientError("KMS Encrypt: the request was damaged in transit", reason="KMS_UNAVAILABLE")
        if response.ciphertext_crc32c != crc32c(response.ciphertext):
            raise TransientError("KMS Encrypt: the response was damaged in transit", reason="KMS_UNAVAILABLE")
        return bytes(response.ciphertext), str(response.name)

    async def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt a wrapped data key."""
        response = await self._call(
            "decrypt",
            {
                "name": self.key_name,
                "ciphertext": wrapped,
                "ciphertext_crc32c": crc32c(wrapped),
                "additional_authenticated_data": aad,
                "additional_authenticated_data_crc32c": crc32c(aad),
            },
        )
        if response.plaintext_crc32c != crc32c(response.plaintext):
            raise TransientError("KMS Decrypt: the response was damaged in transit", reason="KMS_UNAVAILABLE")
        return bytes(response.plaintext)

    async def close(self) -> None:
        """Close the client's channel."""
        if self._client is not None:
            await self._client.transport.close()  # type: ignore[no-untyped-call]
            self._client = None
