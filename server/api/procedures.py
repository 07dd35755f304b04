"""`ProcedureService`: thin servicer over the procedure manager (root key only)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2
from grpc import aio

from cloudact.pipeline.v1 import procedure_pb2, procedure_service_pb2, procedure_service_pb2_grpc
from server.api.convert import timestamp
from server.api.guard import principal_name
from server.api.paging import paginate
from server.procedures import MigrationRun, ProcedureManager, ProcedureView

_OUTCOMES = {
    "created": procedure_pb2.ProcedureSyncResult.OUTCOME_CREATED,
    "updated": procedure_pb2.ProcedureSyncResult.OUTCOME_UPDATED,
    "unchanged": procedure_pb2.ProcedureSyncResult.OUTCOME_UNCHANGED,
    "failed": procedure_pb2.ProcedureSyncResult.OUTCOME_FAILED,
}


def procedure_message(view: ProcedureView, *, with_definition: bool = False) -> procedure_pb2.Procedure:
    """The proto form of a deployed procedure."""
    r = view.routine
    return procedure_pb2.Procedure(
        name=r.name,
        dataset=r.dataset,
        full_name=r.full_name,
        domain=view.domain,
        checksum=view.checksum,
        file_checksum=view.file_checksum,
        create_time=timestamp(r.created),
        update_time=timestamp(r.modified),
        definition=r.definition if with_definition else "",
    )


def execution_message(run: MigrationRun) -> procedure_pb2.MigrationExecution:
    """The proto form of a migration execution."""
    rows = []
    for row in run.rows:
        s = struct_pb2.Struct()
        s.update(row)
        rows.append(s)
    return procedure_pb2.MigrationExecution(
        name=run.name,
        dataset=run.dataset,
        checksum=run.checksum,
        dry_run=run.dry_run,
        executed_by=run.executed_by,
        execute_time=timestamp(run.executed_at),
        rows=rows,
    )


class ProcedureServicer(procedure_service_pb2_grpc.ProcedureServiceServicer):
    """Admin calls on stored procedures and migrations."""

    def __init__(self, manager: ProcedureManager) -> None:
        self._manager = manager

    async def ListProcedures(
        self, request: procedure_service_pb2.ListProceduresRequest, context: aio.ServicerContext[Any, Any]
    ) -> procedure_service_pb2.ListProceduresResponse:
        views = await self._manager.deployed()
        page, token = paginate(
            views, lambda v: v.routine.name, request.page_size, request.page_token, default=100, maximum=1000
        )
        return procedure_service_pb2.ListProceduresResponse(
            procedures=[procedure_message(v) for v in page], next_page_token=token, total_size=len(views)
        )

    async def GetProcedure(
        self, request: procedure_service_pb2.GetProcedureRequest, context: aio.ServicerContext[Any, Any]
    ) -> procedure_service_pb2.GetProcedureResponse:
        view = await self._manager.get(request.name)
        return procedure_service_pb2.GetProcedureResponse(
            procedure=procedure_message(view, with_definition=True)
        )

    async def SyncProcedures(
        self, request: procedure_service_pb2.SyncProceduresRequest, context: aio.ServicerContext[Any, Any]
    ) -> procedure_service_pb2.SyncProceduresResponse:
        results = await self._manager.sync(
            force=request.force, names=list(request.names), domain=request.domain
        )
        counts = {k: sum(r.outcome == k for r in results) for k in _OUTCOMES}
        return procedure_service_pb2.SyncProceduresResponse(
            results=[
                procedure_pb2.ProcedureSyncResult(
                    name=r.name,
                    domain=r.domain,
                    outcome=_OUTCOMES[r.outcome],
                    checksum=r.checksum,
                    error=r.error,
                )
                for r in results
            ],
            **counts,
        )

    async def DeleteProcedure(
        self, request: procedure_service_pb2.DeleteProcedureRequest, context: aio.ServicerContext[Any, Any]
    ) -> procedure_service_pb2.DeleteProcedureResponse:
        return procedure_service_pb2.DeleteProcedureResponse(
            full_name=await self._manager.delete(request.name)
        )

    async def ExecuteMigration(
        self, request: procedure_service_pb2.ExecuteMigrationRequest, context: aio.ServicerContext[Any, Any]
    ) -> procedure_service_pb2.ExecuteMigrationResponse:
        outcomes = await self._manager.execute_migration(
            request.name,
            request.dataset,
            dry_run=request.dry_run,
            force=request.force,
            executed_by=principal_name(),
        )
        results = [
            procedure_service_pb2.MigrationDatasetResult(
                dataset=o.dataset,
                execution=execution_message(o.run) if o.run else None,
                already_applied=o.already_applied,
                error_reason=o.error_reason,
                error=o.error,
            )
            for o in outcomes
        ]
        single = outcomes[0] if request.dataset else None
        return procedure_service_pb2.ExecuteMigrationResponse(
            execution=execution_message(single.run) if single and single.run else None,
            already_applied=bool(single and single.already_applied),
            results=results,
            executed=sum(o.run is not None and not o.already_applied for o in outcomes),
            skipped=sum(o.already_applied for o in outcomes),
            failed=sum(o.run is None for o in outcomes),
        )
