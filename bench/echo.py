"""The bare baseline: a `grpc.aio` server exposing `PipelineService` whose RunPipeline returns a constant
response at once; no interceptor, auth, engine, ledger or warehouse.

It serves the real service descriptor, so Envoy's JSON transcoder routes REST calls to it exactly as it
does to the real service. The constant response is a real one captured from the service, so both
servers serialize (and Envoy transcodes) the same bytes.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc


class EchoPipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """RunPipeline answers `response`; every other method is the generated UNIMPLEMENTED stub."""

    def __init__(self, response: pipeline_service_pb2.RunPipelineResponse) -> None:
        self._response = response

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        return self._response


class EchoServer:
    """A running echo server on 127.0.0.1."""

    def __init__(self, server: aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    @classmethod
    async def start(cls, response: pipeline_service_pb2.RunPipelineResponse) -> EchoServer:
        """Serve on a free port with the real server's options (no interceptors)."""
        server = aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        )
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
            EchoPipelineServicer(response), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return cls(server, port)

    async def stop(self) -> None:
        """Stop at once."""
        await self.server.stop(0)
