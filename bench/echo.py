"""The bare baseline: a `grpc.aio` server exposing `PipelineService` whose RunPipeline returns a constant
response at once; no guard, auth, engine, ledger or warehouse.

Its *floor* variant does per call the least that any RunPipeline implementation must do: a new run
(fresh id, create time, the request's names and parameters, the pipeline's steps) handed to a task that
ends at once, and that run as the answer. Still no auth, validation, engine, ledger or warehouse: what
the floor loses against the bare server is lost before the service does any of its own work.

It serves the real service descriptor, so Envoy's JSON transcoder routes REST calls to it exactly as it
does to the real service. The constant response is a real one captured from the service, so both
servers serialize (and Envoy transcodes) the same bytes. The benchmark runs it in its own process
(`python -m bench.echo`: the serialized response in hex on the first stdin line, the port on stdout,
stops when stdin closes), so nothing of the real service shares its interpreter.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server.api.convert import timestamp
from server.ids import new_id

START_SECONDS = 30.0  # the child must listen within this
STOP_SECONDS = 10.0  # and exit within this once its stdin is closed


class EchoPipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """RunPipeline answers `response`; every other method is the generated UNIMPLEMENTED stub."""

    def __init__(self, response: pipeline_service_pb2.RunPipelineResponse) -> None:
        self._response = response

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        return self._response


async def _ends_at_once() -> None:
    return None


class FloorPipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """RunPipeline makes a new run per call and starts a task for it; nothing else."""

    def __init__(self, response: pipeline_service_pb2.RunPipelineResponse) -> None:
        self._steps = list(response.run.steps)
        self._tasks: set[asyncio.Task[None]] = set()

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        run = pipeline_run_pb2.PipelineRun(
            run_id=new_id(),
            org_slug=request.org_slug,
            provider=request.provider,
            domain=request.domain,
            pipeline=request.pipeline,
            state=pipeline_run_pb2.RUN_STATE_PENDING,
            trigger=pipeline_run_pb2.TRIGGER_API,
            parameters=request.parameters,
            create_time=timestamp(datetime.now(UTC)),
            steps=self._steps,
        )
        task = asyncio.create_task(_ends_at_once())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pipeline_service_pb2.RunPipelineResponse(run=run)


class EchoServer:
    """A running echo server on 127.0.0.1."""

    def __init__(self, server: aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    @classmethod
    async def start(
        cls, response: pipeline_service_pb2.RunPipelineResponse, *, floor: bool = False
    ) -> EchoServer:
        """Serve on a free port with the real server's options (no guard)."""
        server = aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        )
        servicer = FloorPipelineServicer(response) if floor else EchoPipelineServicer(response)
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return cls(server, port)

    async def stop(self) -> None:
        """Stop at once."""
        await self.server.stop(0)


async def _serve_until_stdin_closes() -> None:
    response_hex, _, mode = sys.stdin.readline().strip().partition(" ")
    response = pipeline_service_pb2.RunPipelineResponse.FromString(bytes.fromhex(response_hex))
    echo = await EchoServer.start(response, floor=mode == "floor")
    sys.stdout.write(f"{echo.port}\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.read)  # returns when the parent closes our stdin (or dies)
    await echo.stop()


class EchoProcess:
    """The echo server in its own process, so that nothing of the real service shares its interpreter."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @classmethod
    async def start(
        cls, response: pipeline_service_pb2.RunPipelineResponse, *, floor: bool = False
    ) -> EchoProcess:
        """Start `python -m bench.echo` (the floor variant if `floor`); return once it listens."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.echo",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None
        mode = " floor" if floor else ""
        process.stdin.write(f"{response.SerializeToString().hex()}{mode}\n".encode())
        await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_SECONDS)
            port = int(line)
        except (TimeoutError, ValueError):
            process.kill()
            await process.wait()
            raise RuntimeError("the echo server did not start") from None
        return cls(process, port)

    async def stop(self) -> None:
        """Close its stdin (it stops its server and exits); kill it if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_SECONDS)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


if __name__ == "__main__":
    asyncio.run(_serve_until_stdin_closes())
