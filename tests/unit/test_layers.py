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
    http = sorted(str(p.relative_to(PROJECT_ROOT)) for p in everything if aiohttp_client(p))
    assert http == ["server/http/client.py"]
    # aiohttp's web server only serves the local stack (the provider sandbox, the Slack receiver of the
    # notification sinks); it never calls out
    servers = sorted(
        str(p.relative_to(PROJECT_ROOT))
        for p, f in everything.items()
        if any(i.startswith("aiohttp") for i in f)
    )
    assert set(servers) - set(http) == {"server/localstack/providers.py", "server/localstack/sinks.py"}


def aiohttp_client(path: Path) -> bool:
    """Whether a module imports aiohttp for anything but its web server (`from aiohttp import web`)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "aiohttp"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aiohttp":
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if any(not n.startswith("aiohttp.web") for n in names):
            return True
    return False
