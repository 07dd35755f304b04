"""Composition root: the only place that builds concrete adapters and wires the server together."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

from dotenv import dotenv_values
from grpc import aio
from grpc_health.v1 import _async as health_aio  # the documented `health.aio`, typed by its module
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio  # `reflection.aio`, typed by its module
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from cloudact.pipeline.v1 import (
    notification_service_pb2,
    notification_service_pb2_grpc,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    procedure_service_pb2_grpc,
    scheduler_service_pb2,
    scheduler_service_pb2_grpc,
)
from cloudact.pipeline.v1 import procedure_service_pb2 as _procedure_service_pb2
from server import meta, metrics
from server.api.guard import GenericOnly, Guard
from server.api.notifications import NotificationServicer
from server.api.pipelines import PipelineServicer
from server.api.procedures import ProcedureServicer
from server.api.scheduler import SchedulerServicer
from server.auth import Access, Authenticator, Policy
from server.credentials.store import CredentialStore
from server.credentials.vault import CredentialVault
from server.engine.manager import RunManager
from server.engine.processor import ProcessorRegistry
from server.engine.runner import StepRunner
from server.http.client import HttpSettings, OutboundHttp
from server.kms import KeyEncryptionKey
from server.ledger import Ledger
from server.notify import config as notify_config
from server.notify.notifier import Notifier
from server.notify.webhooks import SlackWebhooks
from server.orgs import OrgRepository
from server.pipelines.catalog import PipelineCatalog
from server.procedures import ProcedureManager
from server.providers import ProviderRegistry
from server.scheduler.scheduler import Scheduler, SchedulerSettings
from server.settings import Settings, env_file
from server.state.retention import Retention, RetentionPolicy
from server.state.scheduling import Caps
from server.state.store import StateStore
from server.warehouse.bigquery import GOOGLE_TOKEN_URL, BigQueryWarehouse

log = logging.getLogger(__name__)

PIPELINE_SERVICE = pipeline_service_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name
PROCEDURE_SERVICE = _procedure_service_pb2.DESCRIPTOR.services_by_name["ProcedureService"].full_name
SCHEDULER_SERVICE = scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
NOTIFICATION_SERVICE = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name
SERVICES = (PIPELINE_SERVICE, PROCEDURE_SERVICE, SCHEDULER_SERVICE, NOTIFICATION_SERVICE)

_ROOT = Policy(Access.ROOT)
POLICIES: dict[str, Policy] = {
    f"/{PIPELINE_SERVICE}/ListPipelines": Policy(Access.ORG, "pipelines:read"),
    f"/{PIPELINE_SERVICE}/GetPipelineRun": Policy(Access.ORG, "pipelines:read"),
    f"/{PIPELINE_SERVICE}/ListPipelineRuns": Policy(Access.ORG, "pipelines:read"),
    f"/{PIPELINE_SERVICE}/WatchPipelineRun": Policy(Access.ORG, "pipelines:read"),
    f"/{PIPELINE_SERVICE}/RunPipeline": Policy(Access.ORG, "pipelines:run"),
    f"/{PIPELINE_SERVICE}/CancelPipelineRun": Policy(Access.ORG, "pipelines:run"),
    f"/{SCHEDULER_SERVICE}/ListSchedules": Policy(Access.ORG, "pipelines:read"),
    f"/{SCHEDULER_SERVICE}/GetBackfill": Policy(Access.ORG, "pipelines:read"),
    f"/{SCHEDULER_SERVICE}/UpdateSchedule": Policy(Access.ORG, "pipelines:run"),
    f"/{SCHEDULER_SERVICE}/DeleteSchedule": Policy(Access.ORG, "pipelines:run"),
    f"/{SCHEDULER_SERVICE}/CreateBackfill": Policy(Access.ORG, "pipelines:run"),
    f"/{SCHEDULER_SERVICE}/CancelBackfill": Policy(Access.ORG, "pipelines:run"),
    f"/{SCHEDULER_SERVICE}/TriggerScheduler": _ROOT,
    f"/{NOTIFICATION_SERVICE}/GetNotificationSettings": Policy(Access.ORG, "pipelines:read"),
    f"/{NOTIFICATION_SERVICE}/ListNotifications": Policy(Access.ORG, "pipelines:read"),
    f"/{NOTIFICATION_SERVICE}/UpdateNotificationSettings": Policy(Access.ORG, "pipelines:admin"),
    f"/{SCHEDULER_SERVICE}/GetSchedulerStatus": _ROOT,
    **{
        f"/{PROCEDURE_SERVICE}/{m}": _ROOT
        for m in ("ListProcedures", "GetProcedure", "SyncProcedures", "DeleteProcedure", "ExecuteMigration")
    },
}


# Requests are at most 1 MiB through Envoy (plus framing); metadata up to 32 KiB so that Envoy's 8 KiB of
# client headers plus what it adds (forwarding headers, the original path) never hit gRPC's own limit.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 2 * 1024 * 1024),
    ("grpc.max_metadata_size", 32 * 1024),
    ("grpc.absolute_max_metadata_size", 64 * 1024),
]


def build_warehouse(settings: Settings, google_token_url: str | None = None) -> BigQueryWarehouse:
    """The warehouse adapter for these settings (emulator endpoint locally, BigQuery elsewhere).

    `google_token_url` (the registry's `gcp` token URL) is where a customer's service account, used to
    read its billing export, gets its tokens.
    """
    return BigQueryWarehouse(
        project=settings.gcp_project_id,
        location=settings.bigquery_location,
        endpoint=settings.bigquery_endpoint,
        job_timeout=settings.bigquery_job_timeout_seconds,
        retry_deadline=settings.bigquery_retry_deadline_seconds,
        google_token_url=google_token_url or GOOGLE_TOKEN_URL,
    )


async def connect_state(settings: Settings, *, upgrade: bool = True) -> StateStore:
    """The state store for these settings (DATABASE_URL, or Cloud SQL through the Python Connector);
    with `upgrade`, its schema migrations are applied first."""
    return await StateStore.connect(
        dsn=settings.database_url.get_secret_value(),
        cloud_sql_instance=settings.cloud_sql_instance,
        user=settings.database_user,
        database=settings.database_name,
        pool_size=settings.database_pool_size,
        lease_seconds=settings.replica_lease_seconds,
        commit_delay=settings.state_commit_delay_ms / 1000,
        upgrade=upgrade,
    )


def retention_policy(settings: Settings) -> RetentionPolicy:
    """How long the state store keeps finished things."""
    return RetentionPolicy(
        runs_days=settings.run_retention_days,
        jobs_days=settings.job_retention_days,
        notifications_days=settings.notification_log_retention_days,
    )


def scheduler_settings(settings: Settings) -> SchedulerSettings:
    """The scheduler's part of the settings."""
    return SchedulerSettings(
        tick_seconds=settings.scheduler_tick_seconds,
        caps=Caps(total=settings.scheduler_max_running, per_org=settings.scheduler_org_max_running),
        retry_base_seconds=settings.scheduler_retry_base_seconds,
        retry_max_seconds=settings.scheduler_retry_max_seconds,
        max_catch_up=timedelta(hours=settings.scheduler_catch_up_hours),
    )


def load_notifications(settings: Settings) -> notify_config.NotificationConfig:
    """The global notification settings, `${VAR}`s expanded from the environment and the env file."""
    env = {k: v for k, v in dotenv_values(env_file(settings.pipeline_env.value)).items() if v is not None}
    env.update(os.environ)
    return notify_config.load(settings.notifications_config, env)


def build_kek(settings: Settings) -> KeyEncryptionKey:
    """Cloud KMS when a key name is set (always in stage/prod), else the local key file."""
    if settings.kms_key_name:
        from server.kms.cloud import CloudKms  # google.cloud.kms is imported only when KMS is used

        return CloudKms(
            settings.kms_key_name,
            endpoint=settings.kms_endpoint,
            insecure=settings.kms_insecure,
            timeout=settings.kms_timeout_seconds,
        )
    from server.kms.local import LocalKeyFile

    return LocalKeyFile(settings.local_kek_file)


def build_http(settings: Settings, registry: ProviderRegistry) -> OutboundHttp:
    """The process's outbound HTTP client."""
    return OutboundHttp(
        registry,
        HttpSettings(
            connect_timeout=settings.http_connect_timeout_seconds,
            read_timeout=settings.http_read_timeout_seconds,
            total_timeout=settings.http_total_timeout_seconds,
            max_attempts=settings.http_max_attempts,
            backoff_initial=settings.http_backoff_initial_seconds,
            backoff_max=settings.http_backoff_max_seconds,
            retry_budget=settings.http_retry_budget_seconds,
            max_response_bytes=settings.http_max_response_bytes,
            max_connections=settings.http_max_connections,
            max_connections_per_host=max(1, settings.http_max_connections // 5),
        ),
    )


def build_vault(
    settings: Settings, warehouse: BigQueryWarehouse, registry: ProviderRegistry
) -> CredentialVault:
    """The credential store behind its cache."""
    store = CredentialStore(warehouse, settings.meta_dataset, registry, build_kek(settings))
    return CredentialVault(store, settings.credential_cache_ttl_seconds)


@dataclass
class Service:
    """A running gRPC server and what it owns."""

    settings: Settings
    warehouse: BigQueryWarehouse
    server: aio.Server
    health: health_aio.HealthServicer
    port: int
    orgs: OrgRepository
    procedures: ProcedureManager
    catalog: PipelineCatalog
    runs: RunManager
    state: StateStore
    ledger: Ledger
    retention: Retention
    scheduler: Scheduler
    notifier: Notifier
    webhooks: SlackWebhooks
    http: OutboundHttp
    vault: CredentialVault
    metrics_port: int = 0

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, drain in-flight calls, cancel runs, give the lease up, close."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grpc_grace_seconds)
        self.scheduler.stop_claiming()
        await self.runs.close()
        await self.scheduler.close()
        await self.notifier.close()
        await self.ledger.close()
        await self.retention.close()
        await self.state.close()
        await self.http.close()
        await self.vault.store.close()
        await self.warehouse.close()


YOUNG_COLLECTION = 20_000  # allocations between young-generation collections (CPython's default: 700)


def settle_heap() -> None:
    """Once a process's one service has started: collect, then move every object alive now (modules,
    configs, clients: the long-lived heap) out of the cyclic collector's reach (`gc.freeze`), so that its
    full collections walk only what the calls create (they took ~10 % of the server's CPU under load
    otherwise); and collect the young generation every `YOUNG_COLLECTION` allocations instead of 700
    (a call allocates hundreds of objects, nearly all freed by reference counting: in the benchmark the
    collector's time fell from 7-9 to ~1.4 µs per run, for at most a few MB of cyclic garbage waiting
    longer). For processes that serve one service (`serve`, `dev`, the
    benchmark), not for tests that start many in one process (what a frozen service leaves behind is
    never collected)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION, middle, old)


async def start(
    settings: Settings, *, warehouse: BigQueryWarehouse | None = None, bootstrap: bool = True
) -> Service:
    """Validate configs, bootstrap the meta tables, and start serving on the configured address."""
    notifications = load_notifications(settings)  # a missing ${VAR} of an enabled channel stops here
    registry = ProcessorRegistry(settings.processor_dirs)
    catalog = PipelineCatalog.load(settings.configs_dir)
    catalog.check_processors(registry)
    providers = ProviderRegistry.load(settings.providers_file)
    warehouse = warehouse or build_warehouse(settings, providers.google_token_url())
    http = build_http(settings, providers)
    vault = build_vault(settings, warehouse, providers)
    orgs = OrgRepository.for_settings(warehouse, settings)
    procedures = ProcedureManager(
        warehouse, settings.meta_dataset, settings.procedures_dir, org_datasets=orgs.active_datasets
    )
    authenticator = Authenticator(
        root_key=settings.ca_root_api_key.get_secret_value(),
        lookup=orgs.find_by_key_hash,
        ttl=settings.auth_cache_ttl_seconds,
        failures_per_minute=settings.auth_failures_per_minute,
    )
    state = await connect_state(settings)
    runs = RunManager(
        catalog=catalog,
        runner=StepRunner(
            registry,
            global_limit=asyncio.Semaphore(settings.max_concurrent_steps),
            per_run_limit=settings.max_parallel_steps_per_run,
        ),
        store=state,
        warehouse=warehouse,
        meta_dataset=settings.meta_dataset,
        http=http,
        vault=vault,
    )
    webhooks = SlackWebhooks(vault, http)
    notifier = Notifier(notifications, state.notifications, slack=webhooks)
    runs.on_end = notifier.run_ended
    scheduler = Scheduler(
        catalog=catalog,
        runs=runs,
        store=state,
        orgs=orgs.active_contexts,
        settings=scheduler_settings(settings),
        credentials=vault.store.holders,
        notify=notifier.publish,
    )
    ledger = Ledger(
        warehouse,
        settings.meta_dataset,
        state,
        interval=settings.ledger_flush_seconds,
        loads_per_day=settings.ledger_loads_per_day,
    )
    retention = Retention(state.retention, retention_policy(settings), interval=settings.state_prune_seconds)
    server = aio.server(options=SERVER_OPTIONS)
    # Every method of our services is guarded (a method without a policy fails here, before anything
    # is written); health and reflection are public.
    guard = Guard(authenticator, POLICIES, frozenset(settings.trusted_proxies))
    guard.register(
        server,
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server,
        PipelineServicer(catalog, runs),
    )
    guard.register(
        server,
        procedure_service_pb2_grpc.add_ProcedureServiceServicer_to_server,
        ProcedureServicer(procedures),
    )
    guard.register(
        server,
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server,
        SchedulerServicer(catalog, scheduler),
    )
    guard.register(
        server,
        notification_service_pb2_grpc.add_NotificationServiceServicer_to_server,
        NotificationServicer(state.notifications, webhooks, catalog, notifications),
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, GenericOnly(server))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection_aio.ReflectionServicer(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        ),
        GenericOnly(server),
    )
    if bootstrap:
        await meta.bootstrap(warehouse, settings.meta_dataset, settings.schemas_dir)
    await runs.start()
    scheduler.start()
    ledger.start()
    retention.start()
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await server.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = metrics.serve(settings.metrics_port, settings.grpc_host) if settings.metrics_port else 0
    log.info("gRPC server listening", extra={"fields": {"address": f"{settings.grpc_host}:{port}"}})
    return Service(
        settings,
        warehouse,
        server,
        health_servicer,
        port,
        orgs,
        procedures,
        catalog,
        runs,
        state,
        ledger,
        retention,
        scheduler,
        notifier,
        webhooks,
        http,
        vault,
        metrics_port,
    )
