"""`PipelineService`: thin servicer over the pipeline catalog."""

from __future__ import annotations

from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server.api.interceptor import org_principal
from server.api.paging import paginate
from server.pipelines.catalog import PipelineCatalog, PipelineConfig


def pipeline_message(config: PipelineConfig) -> pipeline_pb2.Pipeline:
    """The proto form of a config."""
    spec = config.spec
    return pipeline_pb2.Pipeline(
        provider=config.provider, domain=config.domain, pipeline=config.pipeline,
        pipeline_id=spec.pipeline_id, display_name=spec.name, description=spec.description,
        version=spec.version,
        steps=[pipeline_pb2.PipelineStep(step_id=s.step_id, ps_type=s.ps_type, depends_on=s.depends_on or [])
               for s in spec.steps],
    )


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Lists (and, with the engine, runs) the pipelines of the calling org."""

    def __init__(self, catalog: PipelineCatalog) -> None:
        self._catalog = catalog

    async def ListPipelines(
        self, request: pipeline_service_pb2.ListPipelinesRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        org_principal()
        configs = [c for c in self._catalog.all() if not request.provider or c.provider == request.provider]
        page, next_token = paginate(configs, lambda c: c.key, request.page_size, request.page_token,
                                    default=50, maximum=500)
        return pipeline_service_pb2.ListPipelinesResponse(
            pipelines=[pipeline_message(c) for c in page], next_page_token=next_token, total_size=len(configs)
        )
