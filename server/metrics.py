"""Prometheus metrics of the service, served on `METRICS_PORT` (0 disables the endpoint)."""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

RUNS_STARTED = Counter("pipeline_runs_started_total", "Runs accepted", ["pipeline"])
RUNS_FINISHED = Counter(
    "pipeline_runs_finished_total", "Runs that reached a terminal state", ["pipeline", "state"]
)
RUNS_ACTIVE = Gauge("pipeline_runs_active", "Runs currently active in this process")
STEP_SECONDS = Histogram(
    "pipeline_step_duration_seconds",
    "Step wall time over all attempts",
    ["ps_type", "state"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
)
QUOTA_REJECTIONS = Counter(
    "pipeline_quota_rejections_total", "RunPipeline calls refused by a quota", ["reason"]
)
SCHEDULER_ENQUEUED = Counter(
    "scheduler_jobs_enqueued_total", "Scheduled jobs inserted by this replica's ticks"
)
SCHEDULER_JOBS = Counter(
    "scheduler_jobs_total",
    "Scheduled job attempts ended here: SUCCEEDED, FAILED, CANCELLED, RETRY, DEFERRED",
    ["outcome"],
)
NOTIFICATIONS = Counter(
    "notifications_total", "Notification outcomes (SENT, FAILED, SUPPRESSED)", ["channel", "outcome"]
)
HTTP_REQUESTS = Counter(
    "provider_http_requests_total",
    "Outbound HTTP attempts by outcome (2xx, 4xx, 429, 5xx, error)",
    ["provider", "outcome"],
)
HTTP_RETRIES = Counter(
    "provider_http_retries_total", "Outbound HTTP retries by reason", ["provider", "reason"]
)
HTTP_THROTTLED = Counter("provider_http_throttled_total", "HTTP 429 answers from providers", ["provider"])
HTTP_SECONDS = Histogram(
    "provider_http_request_duration_seconds",
    "Outbound HTTP attempt latency (to the end of the body)",
    ["provider"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60),
)
CREDENTIAL_DECRYPTS = Counter(
    "credential_decrypts_total",
    "Credential decryptions by outcome (ok, cached, failed)",
    ["provider", "outcome"],
)


@functools.cache
def labelled(metric: M, *values: str) -> M:
    """`metric.labels(*values)`, looked up once per label set (`labels` locks and builds a key per call)."""
    return metric.labels(*values)


def serve(port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics endpoint; return its port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
