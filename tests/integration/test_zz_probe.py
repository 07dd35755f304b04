from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
from grpc import aio

from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.localstack.envoy import Envoy
from server.settings import Settings


async def test_probe(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    from server.auth import FailureThrottle
    orig = FailureThrottle.record
    def rec(self, client):
        print('RECORD', repr(client))
        orig(self, client)
    monkeypatch.setattr(FailureThrottle, 'record', rec)
    svc = await app.start(settings.model_copy(update={"auth_failures_per_minute": 3}))
    envoy = await asyncio.to_thread(Envoy, grpc_port=svc.port, work_dir=tmp_path)
    try:
        async with aiohttp.ClientSession(base_url=envoy.rest_url) as http:
            for i in range(5):
                async with http.get("/api/v1/pipelines", headers={"X-API-Key": "ca_wrong", "X-Forwarded-For": f"10.0.0.{i}"}) as r:
                    print("xff", i, r.status, await r.text())
        for i in range(5):
            async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as ch:
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(ch)
                try:
                    await stub.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(), metadata=(("x-api-key", "bad"),))
                except grpc.aio.AioRpcError as e:
                    print("grpc new channel", i, e.code())
    finally:
        await asyncio.to_thread(envoy.stop)
        await svc.stop()
