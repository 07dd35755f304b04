"""Benchmarks of the pipeline service: `python -m bench` (or `make bench`).

One run starts a persistent BigQuery emulator on a temporary folder, the real service and a bare
`PipelineService` echo server (each behind its own Envoy), all on free 127.0.0.1 ports, measures
RunPipeline throughput and latency, the engine's overhead per step and the warehouse jobs per run, prints
a table and a Markdown summary, and stops everything.
"""

from __future__ import annotations
