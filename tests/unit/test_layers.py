"""Imports run down the layers only: processors never import the engine, and only the adapters import
their vendor libraries."""

from __future__ import annotations

import ast
from pathlib import Path

from server.settings import PROJECT_ROOT


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules(folder: str) -> dict[Path, set[str]]:
    return {p: imports(p) for p in (PROJECT_ROOT / folder).rglob("*.py")}


def test_processors_do_not_import_the_engine() -> None:
    offenders = {
        str(p.relative_to(PROJECT_ROOT)): sorted(
            i for i in found if i.startswith(("server.engine", "server.app"))
        )
        for p, found in {**modules("processors"), **modules("tests/processors")}.items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_vendor_clients_have_one_importer_each() -> None:
    everything = {**modules("server"), **modules("processors")}
    kms = sorted(
        str(p.relative_to(PROJECT_ROOT))
        for p, f in everything.items()
        if any("kms" in i and i.startswith("google.cloud") for i in f)
    )
    assert kms == ["server/kms/cloud.py"]
    http = sorted(str(p.relative_to(PROJECT_ROOT)) for p, f in everything.items() if "aiohttp" in f)
    assert http == ["server/http/client.py"]
    # aiohttp's server side, for the local Slack receiver of `make run` only (it sends nothing).
    servers = sorted(str(p.relative_to(PROJECT_ROOT)) for p, f in everything.items() if "aiohttp.web" in f)
    assert servers == ["server/localstack/sinks.py"]
