"""A fake provider API: an aiohttp server on 127.0.0.1 (free port) answering scripted replies per path.

`script(path, *replies)` queues replies for a path (the last one repeats); a reply may be a callable of
the request. Every request is recorded (method, path, query, headers) so tests can assert on what the
client sent. Replies can be slow before the headers (`delay`) or in the middle of the body (`stall`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    stall: float = 0.0  # pause after the first half of the body

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return orjson.dumps(self.body)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float  # time.monotonic() on arrival


Script = Reply | Callable[[web.Request], Reply | Awaitable[Reply]]


class FakeProvider:
    def __init__(self) -> None:
        self.routes: dict[str, list[Script]] = {}
        self.seen: list[Seen] = []
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}  # per path: most requests in flight at once
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, *replies: Script) -> None:
        self.routes[path] = list(replies)

    def requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.active[path] = self.active.get(path, 0) + 1
        self.max_active[path] = max(self.max_active.get(path, 0), self.active[path])
        try:
            return await self._reply(request)
        finally:
            self.active[path] -= 1

    async def _reply(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path, dict(request.query), dict(request.headers), time.monotonic())
        )
        queue = self.routes.get(request.path)
        if not queue:
            return web.json_response({"error": {"message": "no such route"}}, status=404)
        script = queue.pop(0) if len(queue) > 1 else queue[0]
        reply = script(request) if callable(script) else script
        if inspect.isawaitable(reply):
            reply = await reply
        if reply.delay:
            await asyncio.sleep(reply.delay)
        payload = reply.payload()
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.content_type = "application/json"
        response.content_length = len(payload)
        half = len(payload) // 2
        try:
            await response.prepare(request)
            await response.write(payload[:half])
            if reply.stall:
                await asyncio.sleep(reply.stall)
            await response.write(payload[half:])
            await response.write_eof()
        except ConnectionResetError:  # the client gave up (a timeout or the size cap): expected
            pass
        return response

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
