"""`pipeline-service`: the command line of the service. Every command reads the same settings as the
server (`PIPELINE_ENV` picks `.env.{local,stage,prod}`).

    pipeline-service dev                         local stack: emulator + gRPC server + Envoy (make run)
    pipeline-service serve                       the gRPC server alone (production; Envoy is a sidecar)
    pipeline-service org create SLUG             create an org and print its first API key as JSON
    pipeline-service org keys create SLUG        issue another key
    pipeline-service org keys revoke KEY_ID      revoke a key
    pipeline-service saas import ORG FILE        load SaaS plans from CSV or JSON lines (all or nothing)
    pipeline-service configs validate [FILE...]  validate pipeline configs (all when no file is given)
    pipeline-service query "SQL"                 run one query, print rows as JSON lines
    pipeline-service db status                   the state store's schema migrations, applied or not
    pipeline-service db upgrade                  apply the missing migrations (the server does at start)

Locally, commands that need the warehouse or the state store start the embedded emulator or PostgreSQL
for their duration when it is not already running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server import devstack, logs, meta, saas
from server.app import build_warehouse, connect_state
from server.engine.processor import ProcessorRegistry
from server.errors import NotFoundError, ServiceError
from server.localstack import emulator, postgres
from server.orgs import DEFAULT_SCOPES, OrgRepository
from server.pipelines.catalog import PipelineCatalog, load_config
from server.settings import Settings, load_settings
from server.state import migrate
from server.warehouse.bigquery import BigQueryWarehouse
from server.warehouse.rows import json_value


@asynccontextmanager
async def warehouse_for(settings: Settings) -> AsyncIterator[BigQueryWarehouse]:
    """A warehouse with the meta tables bootstrapped, the emulator started if needed."""
    async with emulator.embedded(settings):
        warehouse = build_warehouse(settings)
        try:
            await meta.bootstrap(warehouse, settings.meta_dataset, settings.schemas_dir)
            yield warehouse
        finally:
            await warehouse.close()


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


async def org_create(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        orgs = OrgRepository.for_settings(wh, settings)
        dataset, key = await orgs.create_org(
            args.slug,
            company_name=args.company or "",
            admin_email=args.email or "",
            currency=args.currency,
            fiscal_year_start_month=args.fiscal_year_start_month,
        )
    _print(
        {
            "org_slug": key.org_slug,
            "dataset": dataset,
            "api_key": key.api_key,
            "api_key_id": key.org_api_key_id,
            "scopes": list(key.scopes),
        }
    )


async def key_create(settings: Settings, args: argparse.Namespace) -> None:
    expires = datetime.now(UTC) + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    async with warehouse_for(settings) as wh:
        orgs = OrgRepository.for_settings(wh, settings)
        key = await orgs.create_key(args.slug, tuple(args.scope or DEFAULT_SCOPES), expires)
    _print(
        {
            "org_slug": key.org_slug,
            "api_key": key.api_key,
            "api_key_id": key.org_api_key_id,
            "scopes": list(key.scopes),
            "expires_at": expires,
        }
    )


async def key_revoke(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        await OrgRepository.for_settings(wh, settings).revoke_key(args.key_id)
    _print({"revoked": args.key_id, "effective_within_seconds": settings.auth_cache_ttl_seconds})


async def saas_import(settings: Settings, args: argparse.Namespace) -> None:
    plans = saas.parse_plans(Path(args.file))
    async with warehouse_for(settings) as wh:
        orgs = OrgRepository.for_settings(wh, settings)
        if not await orgs.exists(args.org):
            raise NotFoundError(f"org {args.org!r} not found", reason="ORG_NOT_FOUND")
        dataset = await orgs.ensure_org_tables(args.org)
        loaded = await saas.import_plans(wh, dataset, plans)
    _print({"org_slug": args.org, "dataset": dataset, "plans_loaded": loaded})


async def configs_validate(settings: Settings, args: argparse.Namespace) -> None:
    if args.files:  # a file is read as {provider}/{domain}/{pipeline}.yml from its last three path parts
        paths = [Path(f).resolve() for f in args.files]
        catalog = PipelineCatalog([load_config(p, p.parents[2]) for p in paths])
    else:
        catalog = PipelineCatalog.load(settings.configs_dir.resolve())
    catalog.check_processors(ProcessorRegistry())
    _print({"valid": [c.key for c in catalog.all()]})


async def query(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        for row in await wh.query(args.sql):
            print(json.dumps(json_value(row)))


async def db(settings: Settings, args: argparse.Namespace) -> None:
    async with postgres.embedded(settings):
        store = await connect_state(settings, upgrade=False)
        try:
            async with store.connection() as conn:
                applied = [m.version for m in await migrate.upgrade(conn)] if args.db == "upgrade" else []
                migrations = await migrate.status(conn)
        finally:
            await store.close()
    _print(
        {
            "applied_now": applied,
            "migrations": [
                {"version": m.version, "name": m.name, "applied_at": m.applied_at, "checksum": m.checksum}
                for m in migrations
            ],
        }
    )


async def serve(settings: Settings, args: argparse.Namespace) -> None:
    await devstack.serve_until_signal(settings)


async def dev(settings: Settings, args: argparse.Namespace) -> None:
    await devstack.run_local_stack(settings)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(prog="pipeline-service", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="run the local stack in the foreground").set_defaults(run=dev)
    commands.add_parser("serve", help="run the gRPC server").set_defaults(run=serve)

    org = commands.add_parser("org", help="orgs and API keys").add_subparsers(
        dest="org_command", required=True
    )
    create = org.add_parser("create", help="create an org")
    create.add_argument("slug")
    create.add_argument("--company")
    create.add_argument("--email")
    create.add_argument("--currency", default="USD")
    create.add_argument("--fiscal-year-start-month", type=int, default=1)
    create.set_defaults(run=org_create)
    keys = org.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="issue a key")
    kc.add_argument("slug")
    kc.add_argument(
        "--scope", action="append", help="repeat for several; default pipelines:read, pipelines:run"
    )
    kc.add_argument("--expires-in-days", type=int)
    kc.set_defaults(run=key_create)
    kr = keys.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    kr.set_defaults(run=key_revoke)

    configs = commands.add_parser("configs", help="pipeline configs").add_subparsers(
        dest="cfg", required=True
    )
    validate = configs.add_parser("validate", help="validate configs")
    validate.add_argument("files", nargs="*")
    validate.set_defaults(run=configs_validate)

    saas_cmd = commands.add_parser("saas", help="SaaS subscription plans").add_subparsers(
        dest="saas", required=True
    )
    imp = saas_cmd.add_parser("import", help="load plans from CSV or JSON lines (all or nothing)")
    imp.add_argument("org")
    imp.add_argument("file")
    imp.set_defaults(run=saas_import)

    q = commands.add_parser("query", help="run one SQL query against the warehouse")
    q.add_argument("sql")
    q.set_defaults(run=query)

    db_cmd = commands.add_parser("db", help="the state store's schema").add_subparsers(
        dest="db", required=True
    )
    db_cmd.add_parser("status", help="show the migrations and which are applied").set_defaults(run=db)
    db_cmd.add_parser("upgrade", help="apply the missing migrations").set_defaults(run=db)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = parser().parse_args(argv)
    logs.configure("WARNING" if args.command not in ("dev", "serve") else "INFO")
    try:
        settings = load_settings()
        command: Callable[[Settings, argparse.Namespace], Coroutine[None, None, None]] = args.run
        asyncio.run(command(settings, args))
    except ServiceError as exc:
        _print(
            {
                "error": exc.reason,
                "message": exc.message,
                **({"detail": exc.detail} if exc.detail else {}),
                "violations": [
                    {"field": v.field, "description": v.description} for v in getattr(exc, "violations", [])
                ],
            }
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
