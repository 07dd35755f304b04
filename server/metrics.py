"""Prometheus metrics of the service, served on `METRICS_PORT` (0 disables the endpoint)."""

from __future__ import annotations

import bisect
import collections
import functools
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

M = TypeVar("M", bound=MetricWrapperBase)

STEP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800)


class RunMetrics:
    """The metrics every run updates: runs started, finished and active, and step wall times.

    They are counted in plain dicts on the event loop, the hot path of every run, and turned into
    Prometheus families only when scraped (a collector of the default registry): a run pays a few dict
    updates instead of five metric objects' locks and checks. The scrape thread reads copies of the
    dicts (each copy is atomic under the GIL).
    """

    def __init__(self) -> None:
        self._started: collections.Counter[str] = collections.Counter()
        self._finished: collections.Counter[tuple[str, str]] = collections.Counter()
        self._steps: dict[tuple[str, str], list[float]] = {}  # bucket counts, then +Inf, then the sum

    def started(self, pipeline: str) -> None:
        """A run of `pipeline` was accepted and is now active."""
        self._started[pipeline] += 1

    def finished(self, pipeline: str, state: str) -> None:
        """An active run of `pipeline` ended in `state`."""
        self._finished[pipeline, state] += 1

    def step(self, ps_type: str, state: str, seconds: float) -> None:
        """A step of `ps_type` ended in `state` after `seconds` over all its attempts."""
        counts = self._steps.get((ps_type, state))
        if counts is None:
            counts = self._steps[ps_type, state] = [0.0] * (len(STEP_BUCKETS) + 2)
        counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1  # the first bucket whose bound >= seconds
        counts[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        started_by, finished_by = dict(self._started), dict(self._finished)
        started = CounterMetricFamily("pipeline_runs_started", "Runs accepted", labels=["pipeline"])
        for pipeline, n in started_by.items():
            started.add_metric([pipeline], n)
        finished = CounterMetricFamily(
            "pipeline_runs_finished", "Runs that reached a terminal state", labels=["pipeline", "state"]
        )
        for (pipeline, state), n in finished_by.items():
            finished.add_metric([pipeline, state], n)
        steps = HistogramMetricFamily(
            "pipeline_step_duration_seconds", "Step wall time over all attempts", labels=["ps_type", "state"]
        )
        bounds = [*map(floatToGoString, STEP_BUCKETS), "+Inf"]
        for labels, counts in dict(self._steps).items():
            *per_bucket, total = list(counts)
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, per_bucket, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            steps.add_metric(list(labels), buckets, total)
        yield started
        yield finished
        active = sum(started_by.values()) - sum(finished_by.values())  # every run ends once
        yield GaugeMetricFamily("pipeline_runs_active", "Runs currently active in this process", active)
        yield steps


RUNS = RunMetrics()
REGISTRY.register(RUNS)
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
