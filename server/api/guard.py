"""The one guard of every RPC: request checks, authentication, org matching and error mapping.

Before anything else, a request that does not parse (a string that is not UTF-8, a corrupt wire format)
is INVALID_ARGUMENT `MALFORMED_REQUEST`, and one whose fields exceed their size limits
(`server/api/limits.py`) is INVALID_ARGUMENT `REQUEST_TOO_LARGE`: neither reaches authentication.
Servicers never read headers: the caller's principal is in `current_principal` while the RPC runs.
A request message with an `org_slug` field must name the org of the caller's key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc import aio

from server import errors
from server.api import limits
from server.api.status import to_status
from server.auth import Authenticator, Policy, Principal, RootPrincipal, check_org
from server.ids import new_id
from server.logs import log_fields
from server.orgs import OrgContext

log = logging.getLogger(__name__)

current_principal: ContextVar[Principal] = ContextVar("current_principal", default=None)


def org_principal() -> OrgContext:
    """The calling org (for methods whose policy requires an org key)."""
    principal = current_principal.get()
    if not isinstance(principal, OrgContext):
        raise errors.PermissionDeniedError("an org API key is required", reason="ORG_KEY_REQUIRED")
    return principal


def principal_name() -> str:
    """A printable name of the caller, for audit columns."""
    principal = current_principal.get()
    if isinstance(principal, RootPrincipal):
        return principal.name
    if isinstance(principal, OrgContext):
        return f"{principal.org_slug}/{principal.org_api_key_id}"
    return "anonymous"


def _peer_address(peer: str) -> str:
    """The address of a gRPC peer without its port (`ipv4:1.2.3.4:5678` -> `1.2.3.4`)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rpartition(":")[0].strip("[]")
    return peer


def _client_of(
    metadata: Mapping[str, str], context: aio.ServicerContext[Any, Any], trusted_proxies: frozenset[str]
) -> str:
    """Who failed attempts are counted against.

    The peer's address without its port (a new connection does not start a fresh count). When the peer
    is a trusted proxy (Envoy), the last `x-forwarded-for` entry instead: Envoy (`use_remote_address`)
    appends the address it saw, and earlier entries are whatever the caller sent. A direct caller's
    `x-forwarded-for` is ignored, so it cannot pick its own identity.
    """
    peer = _peer_address(context.peer())
    hops = [hop.strip() for hop in metadata.get("x-forwarded-for", "").split(",") if hop.strip()]
    return hops[-1] if hops and peer in trusted_proxies else peer


AddServicer = Callable[[Any, Any], None]  # a generated `add_*Servicer_to_server(servicer, server)`


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the guard can answer INVALID_ARGUMENT
    (grpc would answer UNKNOWN with the exception's class name)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _tolerant(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    if deserializer is None:
        raise TypeError(f"{type_name}: the handler has no request deserializer")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Malformed(type_name)

    return deserialize


def _malformed(request: _Malformed) -> errors.InvalidInputError:
    return errors.InvalidInputError(
        f"the request is not a valid {request.type_name} (every string must be valid UTF-8 and every "
        "field of its declared type)",
        reason="MALFORMED_REQUEST",
    )


class GenericOnly:
    """A server as a generated `add_*_to_server` sees it, registering generic handlers only.

    grpc.aio's server waits for the next call with one task per *registered* method (`asyncio.wait` over
    all of them for every call: O(methods) per call, ~27 methods here); generic handlers share one task
    and are found by a dict lookup. So every service is registered as generic handlers only."""

    def __init__(self, server: aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]) -> None:
        """Passed on to the server."""
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Dropped: the generic handlers registered with them serve the same methods."""


class _Captured:
    """Stands in for the server while a generated `add_*_to_server` registers its method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The same handlers arrive, by method name, in `add_registered_method_handlers`."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the guard knows of one method: its policy, whether its request names an org, its limits."""

    policy: Policy
    names_org: bool
    check_limits: Callable[[Any], None]


class Guard:
    """Registers servicers with every handler wrapped once: auth, org match and error mapping.

    The wrapping happens at registration, not per call (an `aio.ServerInterceptor` would build a new
    handler for every RPC). A method without a policy cannot be registered, so none goes unguarded.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        policies: Mapping[str, Policy],
        trusted_proxies: frozenset[str] = frozenset({"127.0.0.1", "::1"}),
    ) -> None:
        self._trusted_proxies = trusted_proxies
        self._auth = authenticator
        self._policies = policies

    def register(self, server: aio.Server, add: AddServicer, servicer: object) -> None:
        """`add(servicer, server)` with each of the servicer's handlers guarded."""
        captured = _Captured()
        add(servicer, captured)
        service = captured.service
        if not service or not captured.handlers:
            raise LookupError(
                f"{add.__name__} registered no method handlers (stubs from an older grpcio-tools?)"
            )
        guarded = {
            name: self._guard(f"/{service}/{name}", handler) for name, handler in captured.handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))

    def _guard(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        policy = self._policies.get(method)
        if policy is None:
            raise LookupError(f"{method} has no access policy")
        service, _, name = method.strip("/").rpartition("/")
        request_type = descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type
        entry = _Entry(policy, "org_slug" in request_type.fields_by_name, limits.checker(request_type))
        deserializer = _tolerant(handler.request_deserializer, request_type.name)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(entry, handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(entry, cast(Callable[..., AsyncIterator[Any]], handler.unary_stream)),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: only unary and server-streaming methods are supported")

    async def _enter(self, entry: _Entry, request: Any, context: aio.ServicerContext[Any, Any]) -> str:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        request_id = metadata.get("x-request-id", "")[:64] or new_id()
        log_fields.set({"request_id": request_id})
        if isinstance(request, _Malformed):
            raise _malformed(request)
        entry.check_limits(request)
        principal = await self._auth.authenticate(
            entry.policy, metadata, lambda: _client_of(metadata, context, self._trusted_proxies)
        )
        if entry.names_org:
            check_org(principal, request.org_slug)
        current_principal.set(principal)
        if isinstance(principal, OrgContext):
            log_fields.set({"request_id": request_id, "org_slug": principal.org_slug})
        return request_id

    async def _fail(
        self, exc: BaseException, request_id: str, context: aio.ServicerContext[Any, Any]
    ) -> None:
        if not isinstance(exc, errors.ServiceError):
            log.exception("unexpected error", extra={"fields": {"request_id": request_id}})
        elif isinstance(exc, errors.TransientError | errors.TerminalError) or exc.detail:
            log.warning("call failed: %s %s (%s)", exc.reason, exc.message, exc.detail or "-")
        # grpc-stubs lacks aio's abort_with_status.
        await cast(Any, context).abort_with_status(to_status(exc, request_id))

    def _wrap_unary(
        self, entry: _Entry, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            request_id = "-"
            try:
                request_id = await self._enter(entry, request, context)
                return await behavior(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(exc, request_id, context)

        return wrapped

    def _wrap_stream(
        self, entry: _Entry, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            request_id = "-"
            try:
                request_id = await self._enter(entry, request, context)
                async for item in behavior(request, context):
                    yield item
            except aio.AbortError:
                raise
            except Exception as exc:
                await self._fail(exc, request_id, context)

        return wrapped
