"""Running the service: `serve` (the gRPC server alone) and `dev` (the whole local stack for `make run`)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server import app, saas
from server.localstack import emulator, postgres, sinks
from server.localstack.envoy import Envoy
from server.localstack.providers import ProviderSandbox
from server.notify.config import EVENTS
from server.orgs import IssuedKey, OrgRepository
from server.settings import Settings
from server.state.notifications import OrgNotificationSettings

log = logging.getLogger(__name__)

DEMO_ORG = "demo"
# The demo org's sandbox credentials (keys the local provider sandbox accepts; not secrets anywhere).
SANDBOX_KEYS = {"openai": "sk-admin-sandbox-demo-0000", "anthropic": "sk-ant-admin01-sandbox-demo-0000"}


async def start_sandbox(settings: Settings) -> ProviderSandbox | None:
    """The local provider sandbox, and the providers pointed at it (real environment variables win)."""
    if not settings.provider_sandbox_port:
        return None
    sandbox = ProviderSandbox({SANDBOX_KEYS["openai"]: DEMO_ORG}, {SANDBOX_KEYS["anthropic"]: DEMO_ORG})
    await sandbox.start(settings.provider_sandbox_port)
    for provider in SANDBOX_KEYS:
        os.environ.setdefault(f"PROVIDER_BASE_URL_{provider.upper()}", sandbox.url)
    return sandbox


async def sandbox_credentials(service: app.Service, sandbox: ProviderSandbox | None) -> list[str]:
    """Give the demo org the sandbox's keys for the providers pointed at the sandbox (never overwrites)."""
    if sandbox is None:
        return []
    have = {c.provider for c in await service.vault.store.list(DEMO_ORG)}
    added = []
    for provider, key in SANDBOX_KEYS.items():
        if os.environ.get(f"PROVIDER_BASE_URL_{provider.upper()}") == sandbox.url and provider not in have:
            await service.vault.store.set(DEMO_ORG, provider, {"admin_api_key": key})
            added.append(provider)
    return added


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_until_signal(settings: Settings) -> None:
    """Start the gRPC server and stop it gracefully on SIGINT/SIGTERM."""
    service = await app.start(settings)
    app.settle_heap()
    try:
        await _wait_for_signal()
    finally:
        await service.stop()


async def demo_org(orgs: OrgRepository, state: Path) -> dict[str, str]:
    """The demo org, its key and its SaaS plans: created on the first run; the key is kept in the
    git-ignored state folder so later runs can print it again."""
    path = state / "demo-org.json"
    key: IssuedKey | None
    if not await orgs.exists(DEMO_ORG):
        dataset, key = await orgs.create_org(DEMO_ORG, company_name="Demo Org")
    else:
        dataset = await orgs.ensure_org_tables(DEMO_ORG)
        key = None if path.exists() else await orgs.create_key(DEMO_ORG)
    if key is None:
        demo: dict[str, str] = json.loads(path.read_text())
    else:
        demo = {
            "org_slug": DEMO_ORG,
            "dataset": dataset,
            "api_key": key.api_key,
            "api_key_id": key.org_api_key_id,
        }
    plans = orgs.warehouse.table_ref(dataset, saas.PLANS_TABLE)
    if not (await orgs.warehouse.query(f"SELECT COUNT(*) AS n FROM {plans}"))[0]["n"]:
        await saas.import_plans(orgs.warehouse, dataset, saas.demo_plans(datetime.now(UTC).date()))
    state.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(demo))
    path.chmod(0o600)
    return demo


async def demo_notifications(service: app.Service, org_slug: str, webhook: str) -> None:
    """The demo org hears about failures through the local sinks (its settings are kept if it has any);
    its webhook is stored as its `slack` credential, like any org's."""
    store = service.state.notifications
    if await store.settings(org_slug) is None:
        await store.put_settings(
            OrgNotificationSettings(
                org_slug,
                ["finops@demo.local"],
                list(EVENTS),
                0,
                {},
                slack_webhook=await service.webhooks.put(org_slug, webhook),
                updated_by="make run",
            )
        )


def banner(settings: Settings, demo: dict[str, str], rest: str, webhook: str = "") -> str:
    """What `make run` prints once everything is up."""
    root = settings.ca_root_api_key.get_secret_value()
    backfill = json.dumps(
        {
            "pipeline": "saas_subscription/costs/saas_cost",
            "start_date": _days_ago(30),
            "end_date": _days_ago(1),
        },
        separators=(",", ":"),
    )
    grpc_addr = f"{settings.grpc_host}:{settings.grpc_port}"
    kek = (
        f"Cloud KMS {settings.kms_key_name}"
        if settings.kms_key_name
        else f"the local key {settings.local_kek_file}"
    )
    return f"""
Pipeline Service is running (Ctrl-C stops everything)
  gRPC    {grpc_addr}        REST (Envoy) {rest}        warehouse {settings.bigquery_endpoint}
  state   PostgreSQL on 127.0.0.1:{settings.postgres_port} (data in {settings.postgres_data_dir})
  metrics http://{settings.grpc_host}:{settings.metrics_port}/metrics
  demo org {demo["org_slug"]}   dataset {demo["dataset"]}
  API key  {demo["api_key"]}

Try:
  export KEY={demo["api_key"]} ROOT={root}
  curl -s {rest}/api/v1/pipelines -H "X-API-Key: $KEY"
  curl -s -X POST {rest}/api/v1/pipelines/run/{demo["org_slug"]}/saas_subscription/costs/saas_cost \\
       -H "X-API-Key: $KEY" -d '{{}}'
  curl -s -X POST {rest}/api/v1/pipelines/run/{demo["org_slug"]}/openai/cost/usage_cost \\
       -H "X-API-Key: $KEY" -d '{{}}'          # last 3 days; or {{"start_date": ..., "end_date": ...}}
  curl -s -X POST {rest}/api/v1/pipelines/run/{demo["org_slug"]}/anthropic/cost/usage_cost \\
       -H "X-API-Key: $KEY" -d '{{}}'          # the demo org's keys point at the local provider sandbox
  .venv/bin/pipeline-service query "SELECT x_SourceSystem, x_ChargeDate, SUM(BilledCost) AS billed \\
       FROM {demo["dataset"]}.cost_data_focus_1_2 GROUP BY 1, 2 ORDER BY 1, 2"
  curl -s "{rest}/api/v1/pipelines/runs?page_size=5" -H "X-API-Key: $KEY"
  .venv/bin/pipeline-service query "SELECT subscription_id, SUM(daily_cost) AS cost \\
       FROM {demo["dataset"]}.saas_subscription_plan_costs_daily GROUP BY 1 ORDER BY 1"
  curl -s {rest}/api/v1/procedures -H "X-CA-Root-Key: $ROOT"
  curl -s -X POST {rest}/api/v1/procedures/sync -H "X-CA-Root-Key: $ROOT" -d '{{}}'
  curl -s -X POST -H "X-CA-Root-Key: $ROOT" \\
       "{rest}/api/v1/migrations/normalize_saas_plan_values/execute?dry_run=true&dataset={demo["dataset"]}"
  .venv/bin/grpcurl -plaintext {grpc_addr} list
  .venv/bin/grpcurl -plaintext -H "x-api-key: $KEY" {grpc_addr} \\
       cloudact.pipeline.v1.PipelineService/ListPipelines
  .venv/bin/grpcurl -plaintext {grpc_addr} grpc.health.v1.Health/Check

Scheduler and notifications (README "Scheduler", "Notifications"):
  curl -s {rest}/api/v1/scheduler/{demo["org_slug"]}/schedules -H "X-API-Key: $KEY"
  curl -s -X POST {rest}/api/v1/scheduler/trigger -H "X-CA-Root-Key: $ROOT" -d '{{}}'
  curl -s -X POST {rest}/api/v1/scheduler/{demo["org_slug"]}/backfills -H "X-API-Key: $KEY" \\
       -d '{backfill}'
  curl -s {rest}/api/v1/scheduler/status -H "X-CA-Root-Key: $ROOT"
  curl -s {rest}/api/v1/notifications/{demo["org_slug"]}/log -H "X-API-Key: $KEY"
  SMTP sink 127.0.0.1:{settings.smtp_sink_port}, Slack receiver {webhook or "(off)"}
  received messages: {settings.state_dir / "notifications"}
Provider credentials (encrypted with {kek}):
  echo '{{"admin_api_key": "sk-admin-..."}}' | \
       .venv/bin/pipeline-service credentials set {demo["org_slug"]} openai --from-file -
  .venv/bin/pipeline-service credentials set {demo["org_slug"]} anthropic --from-file anthropic.json
  .venv/bin/pipeline-service credentials list {demo["org_slug"]}
  .venv/bin/pipeline-service credentials test {demo["org_slug"]} openai
  (providers: configs/system/providers.yml; PROVIDER_BASE_URL_OPENAI=http://127.0.0.1:PORT for a local fake)
"""


def _days_ago(n: int) -> str:
    return (datetime.now(UTC).date() - timedelta(days=n)).isoformat()


async def run_local_stack(settings: Settings) -> None:
    """Emulator, PostgreSQL, provider sandbox, notification sinks, gRPC server and Envoy in the foreground
    until SIGINT/SIGTERM; then stop all."""
    async with emulator.embedded(settings), postgres.embedded(settings), AsyncExitStack() as stack:
        sandbox = await start_sandbox(settings)
        webhook = ""
        if settings.notify_sinks_embedded:
            webhook = await stack.enter_async_context(
                sinks.embedded(
                    settings.state_dir / "notifications", settings.smtp_sink_port, settings.webhook_sink_port
                )
            )
        if webhook:  # the `slack` provider posts to the local receiver (read when the registry loads)
            os.environ.setdefault("PROVIDER_BASE_URL_SLACK", webhook.split("/services/")[0])
        service = await app.start(settings)
        envoy: Envoy | None = None
        try:
            results = await service.procedures.sync()
            failed = [r.name for r in results if r.outcome == "failed"]
            if failed:
                log.warning("procedures failed to sync: %s", failed)
            demo = await demo_org(service.orgs, settings.state_dir)
            await sandbox_credentials(service, sandbox)
            if webhook:
                await demo_notifications(service, demo["org_slug"], webhook)
            envoy = await asyncio.to_thread(
                Envoy,
                grpc_port=service.port,
                rest_port=settings.envoy_port,
                admin_port=settings.envoy_admin_port,
                work_dir=settings.state_dir / "envoy",
            )
            print(banner(settings, demo, envoy.rest_url, webhook), flush=True)
            app.settle_heap()
            await _wait_for_signal()
        finally:
            if envoy is not None:
                await asyncio.to_thread(envoy.stop)
            await service.stop()
            if sandbox is not None:
                await sandbox.stop()
