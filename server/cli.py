"""`pipeline-service`: the command line of the service. Every command reads the same settings as the
server (`PIPELINE_ENV` picks `.env.{local,stage,prod}`).

    pipeline-service dev                         local stack: emulator + gRPC server + Envoy (make run)
    pipeline-service serve                       the gRPC server alone (production; Envoy is a sidecar)
    pipeline-service org create SLUG             create an org and print its first API key as JSON
    pipeline-service org keys create SLUG        issue another key
    pipeline-service org keys revoke KEY_ID      revoke a key
    pipeline-service saas import ORG FILE        load SaaS plans from CSV or JSON lines (all or nothing)
    pipeline-service configs validate [FILE...]  validate pipeline configs (all when no file is given) and
                                                 the provider registry
    pipeline-service query "SQL"                 run one query, print rows as JSON lines
    pipeline-service db status                   the state store's schema migrations, applied or not
    pipeline-service db upgrade                  apply the missing migrations (the server does at start)
    pipeline-service db prune                    delete what the retention settings no longer keep (each
                                                 replica does it every STATE_PRUNE_SECONDS)
    pipeline-service credentials set ORG PROVIDER --from-file FILE|- [--name NAME]
                                                 store (or replace) an org's provider credential (JSON)
    pipeline-service credentials list ORG        the org's credentials, masked
    pipeline-service credentials delete ORG ID   delete one
    pipeline-service credentials test ORG PROVIDER [--name NAME]
                                                 one cheap authenticated call to the provider
    pipeline-service credentials rewrap [--new-local-key]
    pipeline-service prices snapshot [--force]   load the pinned genai-prices data into the price catalog
    pipeline-service prices override ORG PROVIDER MODEL (--rate USD | --discount-pct N) [--token-class C]
                     [--tier T] [--from DATE] [--to DATE]   an org's negotiated rate (MODEL may end in *)
    pipeline-service prices overrides ORG        list them
    pipeline-service prices delete-override ORG ID
                                                 re-wrap every data key with the KEK's primary version

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
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from processors.genai.catalog import package_version
from server import devstack, logs, meta, prices, saas
from server.app import build_http, build_kek, build_warehouse, connect_state, retention_policy
from server.credentials.probe import probe
from server.credentials.store import CredentialStore
from server.engine.processor import ProcessorRegistry
from server.errors import FailedPreconditionError, InvalidInputError, NotFoundError, ServiceError
from server.kms.local import LocalKeyFile
from server.localstack import emulator, postgres
from server.orgs import DEFAULT_SCOPES, OrgRepository
from server.pipelines.catalog import PipelineCatalog, load_config
from server.providers import ProviderRegistry
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
    catalog.check_processors(ProcessorRegistry(settings.processor_dirs))
    providers = ProviderRegistry.load(settings.providers_file)
    _print({"valid": [c.key for c in catalog.all()], "providers": [p.id for p in providers]})


async def prices_snapshot(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        loaded = await prices.ensure_snapshot(wh, settings.meta_dataset, force=args.force)
    _print({"package": "genai-prices", "version": package_version(), "rows_loaded": loaded})


async def _org_dataset(wh: BigQueryWarehouse, settings: Settings, org: str) -> str:
    orgs = OrgRepository.for_settings(wh, settings)
    if not await orgs.exists(org):
        raise NotFoundError(f"org {org!r} not found", reason="ORG_NOT_FOUND")
    return await orgs.ensure_org_tables(org)


async def prices_override(settings: Settings, args: argparse.Namespace) -> None:
    request = prices.OverrideRequest(
        args.provider,
        args.model,
        args.token_class,
        args.tier,
        args.rate,
        args.discount_pct,
        args.effective_from,
        args.effective_to,
    )
    request.check()
    async with warehouse_for(settings) as wh:
        row = await prices.set_override(wh, await _org_dataset(wh, settings, args.org), request)
    _print(json_value(row))


async def prices_overrides(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        found = await prices.list_overrides(wh, await _org_dataset(wh, settings, args.org))
    _print({"org_slug": args.org, "overrides": [json_value(r) for r in found]})


async def prices_delete_override(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        deleted = await prices.delete_override(
            wh, await _org_dataset(wh, settings, args.org), args.override_id
        )
    if not deleted:
        raise NotFoundError(f"override {args.override_id!r} not found", reason="OVERRIDE_NOT_FOUND")
    _print({"deleted": args.override_id})


async def query(settings: Settings, args: argparse.Namespace) -> None:
    async with warehouse_for(settings) as wh:
        for row in await wh.query(args.sql):
            print(json.dumps(json_value(row)))


async def db_prune(settings: Settings, args: argparse.Namespace) -> None:
    async with postgres.embedded(settings):
        store = await connect_state(settings)
        try:
            counts = await store.retention.prune(retention_policy(settings))
        finally:
            await store.close()
    _print({"deleted": counts})


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


@asynccontextmanager
async def credential_store(settings: Settings) -> AsyncIterator[CredentialStore]:
    """The credential store over the warehouse and the configured KEK (Cloud KMS or the local key file)."""
    registry = ProviderRegistry.load(settings.providers_file)
    async with warehouse_for(settings) as wh:
        store = CredentialStore(wh, settings.meta_dataset, registry, build_kek(settings))
        try:
            yield store
        finally:
            await store.close()


def _read_document(source: str) -> object:
    """The credential JSON from a file or `-` (standard input); errors name the position, never content."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(
            f"cannot read {source}: {exc.strerror}", reason="INVALID_CREDENTIAL"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"the credential is not valid JSON (line {exc.lineno}, column {exc.colno})",
            reason="INVALID_CREDENTIAL",
        ) from None


async def _require_org(wh: BigQueryWarehouse, settings: Settings, org: str) -> None:
    if not await OrgRepository.for_settings(wh, settings).exists(org):
        raise NotFoundError(f"org {org[:64]!r} not found", reason="ORG_NOT_FOUND")


async def credentials_set(settings: Settings, args: argparse.Namespace) -> None:
    document = _read_document(args.from_file)
    async with credential_store(settings) as store:
        store.registry.validate_credential(args.provider, document)  # before any warehouse round trip
        await _require_org(store.warehouse, settings, args.org)
        stored = await store.set(args.org, args.provider, document, args.name)
    _print({"stored": stored.public()})


async def credentials_list(settings: Settings, args: argparse.Namespace) -> None:
    async with credential_store(settings) as store:
        _print({"org_slug": args.org, "credentials": [c.public() for c in await store.list(args.org)]})


async def credentials_delete(settings: Settings, args: argparse.Namespace) -> None:
    async with credential_store(settings) as store:
        await store.delete(args.org, args.credential_id)
    _print({"deleted": args.credential_id})


async def credentials_test(settings: Settings, args: argparse.Namespace) -> None:
    async with credential_store(settings) as store:
        http = build_http(settings, store.registry)
        try:
            outcome = await probe(store, http, args.org, args.provider, args.name)
        finally:
            await http.close()
    _print(outcome)
    if not outcome["ok"]:
        raise SystemExit(1)


async def credentials_rewrap(settings: Settings, args: argparse.Namespace) -> None:
    async with credential_store(settings) as store:
        rotated = None
        if args.new_local_key:
            if not isinstance(store.kek, LocalKeyFile):
                raise FailedPreconditionError(
                    "--new-local-key is for the local key file; rotate Cloud KMS keys in Cloud KMS",
                    reason="NOT_LOCAL_KEK",
                )
            rotated = await store.kek.rotate()
        counts = await store.rewrap()
    _print({"new_key_version": rotated, **counts})


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

    creds = commands.add_parser("credentials", help="provider credentials of orgs").add_subparsers(
        dest="credentials_command", required=True
    )
    cs = creds.add_parser("set", help="store or replace a credential (validated against the registry)")
    cs.add_argument("org")
    cs.add_argument("provider")
    cs.add_argument("--from-file", required=True, help="JSON file, or - for standard input")
    cs.add_argument("--name", default="default", help="a second credential of the same provider")
    cs.set_defaults(run=credentials_set)
    cl = creds.add_parser("list", help="the org's credentials, masked")
    cl.add_argument("org")
    cl.set_defaults(run=credentials_list)
    cd = creds.add_parser("delete", help="delete a credential")
    cd.add_argument("org")
    cd.add_argument("credential_id")
    cd.set_defaults(run=credentials_delete)
    ct = creds.add_parser("test", help="one cheap authenticated call to the provider")
    ct.add_argument("org")
    ct.add_argument("provider")
    ct.add_argument("--name", default="default")
    ct.set_defaults(run=credentials_test)
    cr = creds.add_parser("rewrap", help="re-wrap data keys with the KEK's primary version")
    cr.add_argument("--new-local-key", action="store_true", help="local only: add a key version first")
    cr.set_defaults(run=credentials_rewrap)

    pr = commands.add_parser("prices", help="GenAI price catalog and per-org overrides").add_subparsers(
        dest="prices_command", required=True
    )
    ps = pr.add_parser("snapshot", help="load the pinned genai-prices version into the catalog")
    ps.add_argument("--force", action="store_true", help="replace that version's rows")
    ps.set_defaults(run=prices_snapshot)
    po = pr.add_parser("override", help="set an org's negotiated rate or discount")
    po.add_argument("org")
    po.add_argument("provider")
    po.add_argument("model", help="the provider's model string, or a prefix ending in *")
    po.add_argument("--rate", type=Decimal, help="USD per pricing unit (1M tokens; 1K web searches)")
    po.add_argument("--discount-pct", type=Decimal, help="0..100 off the list rate (the contracted rate)")
    po.add_argument("--token-class", help="input, cached_input, output, cache_write_1h, ... (default: all)")
    po.add_argument("--tier", help="standard, batch, flex, priority, ... (default: all)")
    po.add_argument("--from", dest="effective_from", type=date.fromisoformat, help="first day (UTC)")
    po.add_argument("--to", dest="effective_to", type=date.fromisoformat, help="last day (UTC)")
    po.set_defaults(run=prices_override)
    pl = pr.add_parser("overrides", help="list an org's overrides")
    pl.add_argument("org")
    pl.set_defaults(run=prices_overrides)
    pd = pr.add_parser("delete-override", help="delete one override")
    pd.add_argument("org")
    pd.add_argument("override_id")
    pd.set_defaults(run=prices_delete_override)

    q = commands.add_parser("query", help="run one SQL query against the warehouse")
    q.add_argument("sql")
    q.set_defaults(run=query)

    db_cmd = commands.add_parser("db", help="the state store's schema").add_subparsers(
        dest="db", required=True
    )
    db_cmd.add_parser("status", help="show the migrations and which are applied").set_defaults(run=db)
    db_cmd.add_parser("upgrade", help="apply the missing migrations").set_defaults(run=db)
    db_cmd.add_parser("prune", help="delete what the retention settings no longer keep").set_defaults(
        run=db_prune
    )
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
