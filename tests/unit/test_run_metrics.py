"""Run metrics counted on the hot path and exposed as Prometheus families when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import RunMetrics


def _samples(metrics: RunMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_runs_are_counted_by_pipeline_and_end_state_and_the_active_ones_are_a_gauge() -> None:
    metrics = RunMetrics()
    for _ in range(3):
        metrics.started("a/b/c")
    metrics.started("x/y/z")
    metrics.finished("a/b/c", "COMPLETED")
    metrics.finished("a/b/c", "FAILED")
    samples = _samples(metrics)
    assert samples[("pipeline_runs_started_total", (("pipeline", "a/b/c"),))] == 3
    assert samples[("pipeline_runs_started_total", (("pipeline", "x/y/z"),))] == 1
    assert samples[("pipeline_runs_finished_total", (("pipeline", "a/b/c"), ("state", "COMPLETED")))] == 1
    assert samples[("pipeline_runs_finished_total", (("pipeline", "a/b/c"), ("state", "FAILED")))] == 1
    assert samples[("pipeline_runs_active", ())] == 2


def test_step_times_fall_in_cumulative_buckets_whose_bound_is_inclusive() -> None:
    metrics = RunMetrics()
    for seconds in (0.01, 0.011, 1.0, 2000.0):  # on a bound, just over one, on one, past the last
        metrics.step("generic.noop", "SUCCEEDED", seconds)
    metrics.step("generic.noop", "FAILED", 0.2)
    samples = _samples(metrics)

    def bucket(le: str, state: str = "SUCCEEDED") -> float:
        return samples[
            (
                "pipeline_step_duration_seconds_bucket",
                (("le", le), ("ps_type", "generic.noop"), ("state", state)),
            )
        ]

    assert bucket("0.01") == 1
    assert bucket("0.05") == 2
    assert bucket("0.5") == 2
    assert bucket("1.0") == 3
    assert bucket("1800.0") == 3
    assert bucket("+Inf") == 4
    assert bucket("0.1", "FAILED") == 0 and bucket("0.5", "FAILED") == 1
    labels = (("ps_type", "generic.noop"), ("state", "SUCCEEDED"))
    assert samples[("pipeline_step_duration_seconds_count", labels)] == 4
    assert abs(samples[("pipeline_step_duration_seconds_sum", labels)] - 2001.021) < 1e-9
