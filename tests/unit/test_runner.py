"""`StepRunner` with small in-file processors in a pre-filled registry: no server, no warehouse, no imports
of processor modules. Backoff sleeps go to a fake that records the delays unless a test needs time."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import pytest
from pydantic import BaseModel, ValidationError

from processors.base import Processor, RunIdentity, StepContext
from server.engine.processor import ProcessorRegistry
from server.engine.runner import TERMINAL, UNEXPECTED, PreparedStep, RunOutcome, StepEvent, StepRunner
from server.errors import FieldViolation, InvalidInputError, TerminalError, TransientError
from server.pipelines.spec import PipelineSpec, StepSpec

Steps = Mapping[str, Mapping[str, Any]]

# -- processors ------------------------------------------------------------------------------------------


class Ok:
    """Succeeds with `config["outputs"]`, after `config["sleep"]` seconds; records what it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict[str, Any], Steps]] = []

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        self.calls.append((context.step_id, context.attempt, step_config, context.steps))
        await asyncio.sleep(step_config.get("sleep", 0))
        return {"status": "SUCCESS", **step_config.get("outputs", {})}


class Eager:
    """Succeeds at once without awaiting anything."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        return {"status": "SUCCESS"}


class Flaky:
    """Raises TransientError on the first `config["failures"]` attempts, then succeeds."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        if context.attempt <= step_config.get("failures", 1):
            raise TransientError("upstream 503")
        return {"status": "SUCCESS", "attempt": context.attempt}


class AlwaysTransient:
    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        raise TransientError("upstream 503", reason="UPSTREAM_UNAVAILABLE")


class Terminal:
    """Raises TerminalError, after `config["delay"]` seconds."""

    def __init__(self) -> None:
        self.calls = 0

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(step_config.get("delay", 0))
        raise TerminalError("table missing", reason="TABLE_NOT_FOUND")


class Slow:
    """Sleeps `config["seconds"]` on the first `config["slow_attempts"]` attempts; records cancellations."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.cancelled: list[str] = []

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        self.started.append((context.step_id, context.attempt))
        try:
            if context.attempt <= step_config.get("slow_attempts", 99):
                await asyncio.sleep(step_config.get("seconds", 30))
        except asyncio.CancelledError:
            self.cancelled.append(context.step_id)
            raise
        return {"status": "SUCCESS"}


class Stubborn:
    """Swallows a cancellation, cleans up and returns SUCCESS as if nothing happened."""

    def __init__(self) -> None:
        self.swallowed = 0

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.swallowed += 1
        return {"status": "SUCCESS"}


class ReturnsFailed:
    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        return {"status": "FAILED", "error": "quota exceeded", "rows_written": 3}


class ReturnsSkipped:
    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        return {"status": "SKIPPED", "why": "no new data"}


class Garbage:
    """Returns `config["result"]` as is."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        return cast(dict[str, Any], step_config["result"])


class Boom:
    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        raise RuntimeError("connect failed: password=hunter2 at /srv/secret")


class OwnTimeout:
    """Raises a TimeoutError of its own (a library's timeout), not the step's."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        raise TimeoutError("read timed out")


class Gauge:
    """Records the high-water mark of concurrent executions (may be shared by several runs)."""

    def __init__(self) -> None:
        self.current = 0
        self.high = 0

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        self.current += 1
        self.high = max(self.high, self.current)
        try:
            await asyncio.sleep(step_config.get("sleep", 0.02))
        finally:
            self.current -= 1
        return {"status": "SUCCESS"}


class Validated:
    """Declares a `Config` model, which the runner checks against the prepared config."""

    class Config(BaseModel):
        table: str

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        return {"status": "SUCCESS"}


class Registry(ProcessorRegistry):
    """Pre-filled; unknown ps_types fail like the real registry, without importing anything."""

    def __init__(self, processors: Mapping[str, Processor]) -> None:
        super().__init__()
        self._loaded.update(processors)

    def get(self, ps_type: str) -> Processor:
        if ps_type not in self._loaded:
            raise InvalidInputError(f"no processor for ps_type {ps_type!r}", reason="UNKNOWN_PROCESSOR")
        return super().get(ps_type)


# -- harness -----------------------------------------------------------------------------------------------


def step(step_id: str, ps_type: str = "test.ok", **fields: Any) -> dict[str, Any]:
    return {"step_id": step_id, "ps_type": ps_type, **fields}


def pipeline(*steps: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate({"pipeline_id": "demo", "name": "Demo", "steps": list(steps)})


def default_prepare(spec: StepSpec, steps: Steps) -> PreparedStep:
    return PreparedStep(dict(spec.config), spec.enabled is not False)


def make_context(spec: StepSpec, attempt: int, steps: Steps) -> StepContext:
    return StepContext(
        run=RunIdentity("run_1", "acme", "acme_local", "demo", "p/d/demo"),
        step_id=spec.step_id,
        attempt=attempt,
        parameters={},
        steps=steps,
        warehouse=cast(Any, None),
        meta_dataset="organizations",
        log=logging.LoggerAdapter(logging.getLogger("test.runner")),
        http=cast(Any, None),
        secrets=cast(Any, None),
    )


def no_retry_backoff(max_attempts: int, **backoff: float) -> dict[str, Any]:
    return {"max_attempts": max_attempts, "backoff": backoff or {"initial": 1}, "jitter": False}


class Harness:
    """One registry of fresh processors, a runner and a recorder of events and backoff delays."""

    def __init__(
        self,
        *,
        per_run_limit: int = 4,
        global_limit: asyncio.Semaphore | None = None,
        random_value: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        gauge: Gauge | None = None,
    ) -> None:
        self.ok, self.slow, self.terminal, self.gauge = Ok(), Slow(), Terminal(), gauge or Gauge()
        self.stubborn = Stubborn()
        self.registry = Registry(
            {
                "test.ok": self.ok,
                "test.eager": Eager(),
                "test.flaky": Flaky(),
                "test.transient": AlwaysTransient(),
                "test.terminal": self.terminal,
                "test.slow": self.slow,
                "test.stubborn": self.stubborn,
                "test.failed": ReturnsFailed(),
                "test.skipped": ReturnsSkipped(),
                "test.garbage": Garbage(),
                "test.boom": Boom(),
                "test.own_timeout": OwnTimeout(),
                "test.gauge": self.gauge,
                "test.validated": Validated(),
            }
        )
        self.global_limit = global_limit or asyncio.Semaphore(100)
        self.delays: list[float] = []
        self.events: list[StepEvent] = []
        self.seen: dict[tuple[str, str], asyncio.Event] = {}
        self.runner = StepRunner(
            self.registry,
            global_limit=self.global_limit,
            per_run_limit=per_run_limit,
            sleep=sleep or self.fake_sleep,
            random=lambda: random_value,
        )

    async def fake_sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)

    def on_event(self, event: StepEvent) -> None:
        assert event.at.tzinfo is not None and event.at.utcoffset() is not None
        self.events.append(event)
        self.reached(event.step_id, event.state).set()

    def reached(self, step_id: str, state: str) -> asyncio.Event:
        return self.seen.setdefault((step_id, state), asyncio.Event())

    async def run(
        self, spec: PipelineSpec, prepare: Callable[[StepSpec, Steps], PreparedStep] = default_prepare
    ) -> RunOutcome:
        outcome = await self.runner.run(
            spec, prepare=prepare, make_context=make_context, on_event=self.on_event
        )
        check_events(self.events, {sid: o.state for sid, o in outcome.steps.items()})
        return outcome

    def states(self, step_id: str) -> list[str]:
        return [e.state for e in self.events if e.step_id == step_id]

    def order(self, step_id: str, state: str) -> int:
        return next(i for i, e in enumerate(self.events) if e.step_id == step_id and e.state == state)


STEP_EVENTS = re.compile(
    r"^(RUNNING(,RETRYING,RUNNING)*,)?(" + "|".join(sorted(TERMINAL)) + ")$"  # ran, or never started
    r"|^RUNNING(,RETRYING,RUNNING)*,RETRYING,CANCELLED$"  # cancelled during a backoff
)


def check_events(events: list[StepEvent], final: Mapping[str, str]) -> None:
    """Every step: RUNNING → [RETRYING → RUNNING]* → one terminal event matching its outcome (or
    RETRYING → CANCELLED when cancelled during a backoff)."""
    for step_id, state in final.items():
        mine = [e for e in events if e.step_id == step_id]
        sequence = ",".join(e.state for e in mine)
        assert STEP_EVENTS.match(sequence), f"{step_id}: {sequence}"
        assert mine[-1].state == state
        running = [e.attempt for e in mine if e.state == "RUNNING"]
        assert running == list(range(1, len(running) + 1))


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 2)


async def drain(semaphore: asyncio.Semaphore, slots: int) -> None:
    """Assert every slot of `semaphore` is free again (then give them back)."""
    for _ in range(slots):
        await asyncio.wait_for(semaphore.acquire(), 0.5)
    for _ in range(slots):
        semaphore.release()


# -- order and concurrency ---------------------------------------------------------------------------------


async def test_steps_run_sequentially_by_default() -> None:
    h = Harness(global_limit=asyncio.Semaphore(1))  # a waiting step holds no global slot
    spec = pipeline(*(step(s, config={"sleep": 0.01}) for s in ("a", "b", "c")))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED" and outcome.error == ""
    assert list(outcome.steps) == ["a", "b", "c"]
    assert [(e.step_id, e.state) for e in h.events] == [
        ("a", "RUNNING"), ("a", "SUCCEEDED"),
        ("b", "RUNNING"), ("b", "SUCCEEDED"),
        ("c", "RUNNING"), ("c", "SUCCEEDED"),
    ]  # fmt: skip
    assert all(o.state == "SUCCEEDED" and len(o.attempts) == 1 for o in outcome.steps.values())
    assert outcome.steps["a"].ps_type == "test.ok"
    assert outcome.steps["a"].attempts[0].ended_at is not None


async def test_steps_that_never_wait_still_let_the_loop_serve_others_between_them() -> None:
    h = Harness()
    marks: list[str] = []
    spec = pipeline(*(step(s, "test.eager") for s in ("a", "b", "c")))

    async def other() -> None:
        for _ in range(5):
            marks.append("other")
            await asyncio.sleep(0)

    def on_event(event: StepEvent) -> None:
        marks.append(f"{event.step_id}:{event.state}")

    neighbour = asyncio.create_task(other())
    await asyncio.sleep(0)  # it has started and waits for its next turn
    outcome = await h.runner.run(spec, prepare=default_prepare, make_context=make_context, on_event=on_event)
    await neighbour
    assert outcome.state == "COMPLETED"
    steps = [m for m in marks if m != "other"]
    assert steps == ["a:RUNNING", "a:SUCCEEDED", "b:RUNNING", "b:SUCCEEDED", "c:RUNNING", "c:SUCCEEDED"]
    # Between one step's end and the next step's start, the neighbour had a turn.
    for before, after in (("a:SUCCEEDED", "b:RUNNING"), ("b:SUCCEEDED", "c:RUNNING")):
        assert "other" in marks[marks.index(before) : marks.index(after)], marks


async def test_dag_order_with_depends_on_and_forward_references() -> None:
    h = Harness()
    spec = pipeline(
        step("report", depends_on=["merge"]),  # names a later step
        step("extract", depends_on=[]),
        step("left", depends_on=["extract"], config={"sleep": 0.05}),
        step("right", depends_on=["extract"], config={"sleep": 0.05}),
        step("merge", depends_on=["left", "right"]),
    )

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    for child, parents in spec.dependencies().items():
        for parent in parents:
            assert h.order(child, "RUNNING") > h.order(parent, "SUCCEEDED"), (child, parent)
    # left and right are independent: both start before either ends
    assert max(h.order("left", "RUNNING"), h.order("right", "RUNNING")) < min(
        h.order("left", "SUCCEEDED"), h.order("right", "SUCCEEDED")
    )
    assert [c[0] for c in h.ok.calls][-1] == "report"


async def test_steps_ready_together_start_in_pipeline_order() -> None:
    h = Harness()
    spec = pipeline(
        step("root", depends_on=[]),
        step("z", depends_on=["root"]),
        step("a", depends_on=["root"]),
        step("m", depends_on=["root"]),
        step("last", depends_on=["m", "a", "z"]),
    )

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    started = [e.step_id for e in h.events if e.state == "RUNNING"]
    assert started == ["root", "z", "a", "m", "last"]


async def test_a_long_chain_runs_every_step_once_in_order() -> None:
    h = Harness()
    spec = pipeline(*(step(f"s{i}") for i in range(300)))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert [c[0] for c in h.ok.calls] == [f"s{i}" for i in range(300)]


async def test_steps_whose_dependencies_can_never_finish_fail_the_run() -> None:
    # Only a spec built without validation gets here: a cycle (a <-> b) and an unknown dependency (u).
    spec = PipelineSpec.model_construct(
        pipeline_id="demo",
        name="Demo",
        timeout=60.0,
        steps=[
            StepSpec.model_construct(**step("free", depends_on=[])),
            StepSpec.model_construct(**step("a", depends_on=["b"])),
            StepSpec.model_construct(**step("b", depends_on=["a"])),
            StepSpec.model_construct(**step("u", depends_on=["free", "nowhere"])),
        ],
    )
    h = Harness()

    outcome = await h.run(spec)

    assert outcome.state == "FAILED"
    assert outcome.error == "steps with unresolvable dependencies: a, b, u"
    assert {sid: o.state for sid, o in outcome.steps.items()} == {
        "free": "SUCCEEDED",
        "a": "NOT_RUN",
        "b": "NOT_RUN",
        "u": "NOT_RUN",
    }
    assert [c[0] for c in h.ok.calls] == ["free"]


async def test_per_run_limit_caps_concurrency() -> None:
    h = Harness(per_run_limit=2)
    spec = pipeline(*(step(f"s{i}", "test.gauge", depends_on=[]) for i in range(6)))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert h.gauge.high == 2


async def test_global_limit_caps_concurrency_across_runs() -> None:
    shared, gauge = asyncio.Semaphore(3), Gauge()
    first = Harness(global_limit=shared, gauge=gauge)
    second = Harness(global_limit=shared, gauge=gauge)
    spec = pipeline(*(step(f"s{i}", "test.gauge", depends_on=[]) for i in range(4)))

    outcomes = await asyncio.gather(first.run(spec), second.run(spec))

    assert [o.state for o in outcomes] == ["COMPLETED", "COMPLETED"]
    assert gauge.high == 3
    await drain(shared, 3)


async def test_global_slot_is_not_held_during_backoff() -> None:
    holder: list[Harness] = []

    async def sleep_until_other_done(delay: float) -> None:
        # With the only global slot held during the backoff, "other" could never finish.
        await wait_for(holder[0].reached("other", "SUCCEEDED"))

    h = Harness(global_limit=asyncio.Semaphore(1), sleep=sleep_until_other_done)
    holder.append(h)
    spec = pipeline(
        step("flaky", "test.flaky", config={"failures": 1}, retry=no_retry_backoff(2)),
        step("other", depends_on=[]),
    )

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert h.order("flaky", "RETRYING") < h.order("other", "SUCCEEDED") < h.order("flaky", "SUCCEEDED")


# -- timeouts and retries ----------------------------------------------------------------------------------


async def test_timeout_is_retried_then_ends_in_timeout() -> None:
    h = Harness()
    spec = pipeline(
        step("slow", "test.slow", timeout=0.05, retry=no_retry_backoff(2), on_failure="continue"),
        step("after"),
    )

    started = time.monotonic()
    outcome = await h.run(spec)

    assert time.monotonic() - started < 1
    slow = outcome.steps["slow"]
    assert slow.state == "TIMEOUT"
    assert [a.state for a in slow.attempts] == ["TIMEOUT", "TIMEOUT"]
    assert slow.attempts[0].error_reason == "STEP_TIMEOUT"
    assert slow.outputs["status"] == "FAILED"
    assert h.states("slow") == ["RUNNING", "RETRYING", "RUNNING", "TIMEOUT"]
    assert h.delays == [1.0]
    assert outcome.state == "COMPLETED" and outcome.steps["after"].state == "SUCCEEDED"


async def test_timeout_then_success() -> None:
    h = Harness()
    spec = pipeline(
        step("slow", "test.slow", timeout=0.05, config={"slow_attempts": 1}, retry=no_retry_backoff(3))
    )

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert [a.state for a in outcome.steps["slow"].attempts] == ["TIMEOUT", "SUCCEEDED"]


async def test_timeout_without_attempts_left_fails_the_run() -> None:
    h = Harness()
    spec = pipeline(step("slow", "test.slow", timeout=0.05), step("after"))

    outcome = await h.run(spec)

    assert outcome.state == "FAILED"
    assert outcome.error.startswith("step 'slow' failed") and "timed out" in outcome.error
    assert outcome.steps["slow"].state == "TIMEOUT"
    assert outcome.steps["after"].state == "NOT_RUN"


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_a_processors_own_timeout_error_is_a_failure_not_a_step_timeout(timeout: float | None) -> None:
    h = Harness()
    spec = pipeline(step("own", "test.own_timeout", timeout=timeout, retry=no_retry_backoff(3)))

    outcome = await h.run(spec)

    own = outcome.steps["own"]
    assert own.state == "FAILED"
    assert [a.error_reason for a in own.attempts] == ["PROCESSOR_ERROR"]  # not retried, not STEP_TIMEOUT
    assert own.error == UNEXPECTED
    assert h.states("own") == ["RUNNING", "FAILED"]


async def test_transient_error_retried_then_success_with_backoff() -> None:
    h = Harness()
    retry = no_retry_backoff(3, initial=1, multiplier=2, max=60)
    spec = pipeline(step("flaky", "test.flaky", config={"failures": 2}, retry=retry))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    flaky = outcome.steps["flaky"]
    assert flaky.state == "SUCCEEDED" and flaky.outputs == {"status": "SUCCESS", "attempt": 3}
    assert [(a.attempt, a.state, a.error_reason) for a in flaky.attempts] == [
        (1, "FAILED", "TRANSIENT"), (2, "FAILED", "TRANSIENT"), (3, "SUCCEEDED", ""),
    ]  # fmt: skip
    assert h.delays == [1.0, 2.0]
    assert [(e.state, e.attempt) for e in h.events] == [
        ("RUNNING", 1), ("RETRYING", 1), ("RUNNING", 2), ("RETRYING", 2), ("RUNNING", 3), ("SUCCEEDED", 3),
    ]  # fmt: skip
    assert h.events[1].error == "upstream 503" and h.events[1].error_reason == "TRANSIENT"


@pytest.mark.parametrize(("random_value", "expected"), [(0.5, [7.5, 37.5, 37.5]), (0.0, [5.0, 25.0, 25.0])])
async def test_backoff_jitter_and_cap(random_value: float, expected: list[float]) -> None:
    h = Harness(random_value=random_value)
    retry = {"max_attempts": 4, "backoff": {"initial": 10, "multiplier": 10, "max": 50}, "jitter": True}
    spec = pipeline(step("flaky", "test.flaky", config={"failures": 3}, retry=retry))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert h.delays == pytest.approx(expected)


async def test_retries_exhausted_fail_the_step() -> None:
    h = Harness()
    spec = pipeline(step("flaky", "test.transient", retry=no_retry_backoff(3)), step("after"))

    outcome = await h.run(spec)

    flaky = outcome.steps["flaky"]
    assert flaky.state == "FAILED" and len(flaky.attempts) == 3
    assert flaky.error == "upstream 503"
    assert h.events[-2].step_id == "flaky" and h.events[-2].error_reason == "UPSTREAM_UNAVAILABLE"
    assert h.delays == [1.0, 2.0]
    assert outcome.state == "FAILED" and outcome.error == "step 'flaky' failed: upstream 503"
    assert outcome.steps["after"].state == "NOT_RUN"


async def test_non_transient_error_is_not_retried() -> None:
    h = Harness()
    spec = pipeline(step("load", "test.terminal", retry=no_retry_backoff(5)))

    outcome = await h.run(spec)

    load = outcome.steps["load"]
    assert load.state == "FAILED" and load.error == "table missing"
    assert [(a.state, a.error_reason) for a in load.attempts] == [("FAILED", "TABLE_NOT_FOUND")]
    assert h.terminal.calls == 1 and h.delays == []
    assert h.states("load") == ["RUNNING", "FAILED"]


# -- processor results -------------------------------------------------------------------------------------


async def test_processor_returning_failed_is_not_retried() -> None:
    h = Harness()
    spec = pipeline(step("load", "test.failed", retry=no_retry_backoff(3)))

    outcome = await h.run(spec)

    load = outcome.steps["load"]
    assert load.state == "FAILED" and load.error == "quota exceeded" and len(load.attempts) == 1
    assert load.outputs == {"status": "FAILED", "error": "quota exceeded", "rows_written": 3}
    assert h.events[-1].error_reason == "PROCESSOR_FAILED" and h.events[-1].rows_written == 3
    assert outcome.state == "FAILED"


async def test_processor_returning_skipped() -> None:
    h = Harness()
    spec = pipeline(step("fetch", "test.skipped"), step("after"))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    assert outcome.steps["fetch"].state == "SKIPPED"
    assert outcome.steps["fetch"].outputs == {"status": "SKIPPED", "why": "no new data"}
    assert outcome.steps["after"].state == "SUCCEEDED"


@pytest.mark.parametrize("result", [None, "SUCCESS", {"status": "OK"}, {"rows": 1}, {"status": 1}])
async def test_invalid_processor_result(result: object) -> None:
    h = Harness()
    spec = pipeline(step("odd", "test.garbage", config={"result": result}, retry=no_retry_backoff(3)))

    outcome = await h.run(spec)

    odd = outcome.steps["odd"]
    assert odd.state == "FAILED" and len(odd.attempts) == 1
    assert odd.attempts[0].error_reason == "INVALID_PROCESSOR_RESULT"
    assert odd.outputs["status"] == "FAILED"


async def test_unexpected_exception_message_is_not_leaked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = Harness()
    spec = pipeline(step("boom", "test.boom", retry=no_retry_backoff(3)))

    outcome = await h.run(spec)

    boom = outcome.steps["boom"]
    assert boom.state == "FAILED" and boom.error == UNEXPECTED and len(boom.attempts) == 1
    assert boom.attempts[0].error_reason == "PROCESSOR_ERROR"
    assert outcome.error == f"step 'boom' failed: {UNEXPECTED}"
    assert "RuntimeError" not in outcome.error
    assert "unexpected step error RuntimeError at " in caplog.text  # the operator's clue
    for text in (repr(outcome), repr(h.events), caplog.text):
        assert "hunter2" not in text and "/srv/secret" not in text


async def test_rows_written_only_from_an_int() -> None:
    h = Harness()
    spec = pipeline(
        step("a", config={"outputs": {"rows_written": 7}}),
        step("b", config={"outputs": {"rows_written": "7"}}),
        step("c", config={"outputs": {"rows_written": True}}),
    )

    outcome = await h.run(spec)

    assert [o.attempts[0].rows_written for o in outcome.steps.values()] == [7, 0, 0]
    assert [e.rows_written for e in h.events if e.state == "SUCCEEDED"] == [7, 0, 0]


# -- on_failure ------------------------------------------------------------------------------------------


async def test_on_failure_continue_runs_dependents_and_completes() -> None:
    seen: dict[str, Steps] = {}

    def prepare(spec: StepSpec, steps: Steps) -> PreparedStep:
        seen[spec.step_id] = steps
        return default_prepare(spec, steps)

    h = Harness()
    spec = pipeline(step("a", "test.failed", on_failure="continue"), step("b"))

    outcome = await h.run(spec, prepare)

    assert outcome.state == "COMPLETED" and outcome.error == ""
    assert outcome.steps["a"].state == "FAILED"
    assert outcome.steps["b"].state == "SUCCEEDED"
    assert seen["b"]["a"]["status"] == "FAILED"


async def test_on_failure_fail_cancels_siblings_and_marks_the_rest_not_run() -> None:
    h = Harness()
    spec = pipeline(
        step("sibling", "test.slow", depends_on=[]),
        step("bad", "test.terminal", depends_on=[], config={"delay": 0.05}),
        step("after_bad", depends_on=["bad"]),
        step("after_sibling", depends_on=["sibling"]),
    )

    started = time.monotonic()
    outcome = await h.run(spec)

    assert time.monotonic() - started < 1
    assert outcome.state == "FAILED" and outcome.error == "step 'bad' failed: table missing"
    states = {sid: o.state for sid, o in outcome.steps.items()}
    assert states == {
        "sibling": "CANCELLED",
        "bad": "FAILED",
        "after_bad": "NOT_RUN",
        "after_sibling": "NOT_RUN",
    }
    assert h.slow.cancelled == ["sibling"]
    assert h.states("sibling") == ["RUNNING", "CANCELLED"]
    assert h.states("after_bad") == ["NOT_RUN"] and h.states("after_sibling") == ["NOT_RUN"]
    row = outcome.steps["sibling"].attempts[0]
    assert row.state == "CANCELLED" and row.ended_at is not None
    assert h.events[-1].error_reason == "RUN_FAILED"


# -- cancellation ----------------------------------------------------------------------------------------


async def test_cancelling_the_run_cancels_steps_promptly() -> None:
    h = Harness(sleep=asyncio.sleep)  # real backoff sleep: "retrying" sits in a 30 s backoff
    spec = pipeline(
        step("slow", "test.slow", depends_on=[]),
        step("retrying", "test.transient", depends_on=[], retry=no_retry_backoff(3, initial=30)),
        step("after", depends_on=["slow"]),
    )
    task = asyncio.create_task(
        h.runner.run(spec, prepare=default_prepare, make_context=make_context, on_event=h.on_event)
    )
    await wait_for(h.reached("slow", "RUNNING"))
    await wait_for(h.reached("retrying", "RETRYING"))

    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert time.monotonic() - started < 1
    assert h.slow.cancelled == ["slow"]
    assert h.states("slow") == ["RUNNING", "CANCELLED"]
    assert h.states("retrying") == ["RUNNING", "RETRYING", "CANCELLED"]
    assert h.states("after") == ["NOT_RUN"]
    check_events(h.events, {"slow": "CANCELLED", "retrying": "CANCELLED", "after": "NOT_RUN"})
    assert {e.error_reason for e in h.events if e.state in ("CANCELLED", "NOT_RUN")} == {"RUN_CANCELLED"}
    await drain(h.global_limit, 100)


async def test_each_attempt_is_reported_as_ended_exactly_once() -> None:
    h = Harness(sleep=asyncio.sleep)
    spec = pipeline(
        step("ok", depends_on=[]),
        step("retrying", "test.transient", depends_on=[], retry=no_retry_backoff(3, initial=30)),
    )
    task = asyncio.create_task(
        h.runner.run(spec, prepare=default_prepare, make_context=make_context, on_event=h.on_event)
    )
    await wait_for(h.reached("ok", "SUCCEEDED"))
    await wait_for(h.reached("retrying", "RETRYING"))
    task.cancel()  # "retrying" sits in its backoff: attempt 1 was already reported by RETRYING
    with pytest.raises(asyncio.CancelledError):
        await task
    ends = {(e.step_id, e.state): e.attempt_started_at for e in h.events}
    running = {e.step_id: e.at for e in h.events if e.state == "RUNNING"}
    assert ends[("ok", "SUCCEEDED")] == running["ok"]
    assert ends[("retrying", "RETRYING")] == running["retrying"]
    assert ends[("retrying", "CANCELLED")] is None
    assert all(e.attempt_started_at is None for e in h.events if e.state == "RUNNING")


async def test_a_processor_swallowing_the_cancel_does_not_keep_the_run_going() -> None:
    h = Harness()
    spec = pipeline(step("stubborn", "test.stubborn"), step("after"))  # sequential: runs in the run's task
    task = asyncio.create_task(
        h.runner.run(spec, prepare=default_prepare, make_context=make_context, on_event=h.on_event)
    )
    await wait_for(h.reached("stubborn", "RUNNING"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.stubborn.swallowed == 1
    assert h.states("after") == ["NOT_RUN"]
    assert h.ok.calls == []


async def test_a_pipeline_timeout_ends_a_run_whose_processor_swallows_the_cancel() -> None:
    h = Harness()
    spec = pipeline(step("stubborn", "test.stubborn"), step("after"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await h.runner.run(spec, prepare=default_prepare, make_context=make_context, on_event=h.on_event)
    assert h.stubborn.swallowed == 1
    assert h.states("after") == ["NOT_RUN"]


async def test_cancelling_one_run_leaves_another_completing() -> None:
    h = Harness(global_limit=asyncio.Semaphore(2))
    doomed_events: list[StepEvent] = []
    doomed_running = asyncio.Event()

    def on_doomed_event(event: StepEvent) -> None:
        doomed_events.append(event)
        if event.state == "RUNNING":
            doomed_running.set()

    doomed = asyncio.create_task(
        h.runner.run(
            pipeline(step("slow", "test.slow"), step("never")),
            prepare=default_prepare,
            make_context=make_context,
            on_event=on_doomed_event,
        )
    )
    survivor = asyncio.create_task(
        h.run(
            pipeline(*(step(f"s{i}", config={"sleep": 0.02}) for i in range(3)), step("tail", depends_on=[]))
        )
    )
    await wait_for(doomed_running)

    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    outcome = await asyncio.wait_for(survivor, 2)

    assert outcome.state == "COMPLETED"
    assert all(o.state == "SUCCEEDED" for o in outcome.steps.values())
    assert not [e for e in h.events if e.state in ("CANCELLED", "NOT_RUN")]
    assert [(e.step_id, e.state) for e in doomed_events] == [
        ("slow", "RUNNING"), ("slow", "CANCELLED"), ("never", "NOT_RUN"),
    ]  # fmt: skip
    await drain(h.global_limit, 2)


# -- prepare, enabled and outputs ---------------------------------------------------------------------------


async def test_prepare_error_fails_the_step_without_retry() -> None:
    def prepare(spec: StepSpec, steps: Steps) -> PreparedStep:
        if spec.step_id == "b":
            raise InvalidInputError(
                "unknown template variable steps.x", [FieldViolation("config.table", "no step x")],
                reason="TEMPLATE_ERROR",
            )  # fmt: skip
        return default_prepare(spec, steps)

    h = Harness()
    spec = pipeline(step("a"), step("b", retry=no_retry_backoff(3)), step("c"))

    outcome = await h.run(spec, prepare)

    b = outcome.steps["b"]
    assert b.state == "FAILED" and b.error == "unknown template variable steps.x"
    assert [(a.attempt, a.state, a.error_reason) for a in b.attempts] == [(1, "FAILED", "TEMPLATE_ERROR")]
    assert h.states("b") == ["FAILED"] and h.delays == []
    assert [c[0] for c in h.ok.calls] == ["a"]
    assert outcome.state == "FAILED" and outcome.steps["c"].state == "NOT_RUN"


async def test_unknown_processor_and_invalid_rendered_config_fail_the_step() -> None:
    h = Harness()
    spec = pipeline(
        step("nope", "test.missing", on_failure="continue"),
        step("bad_config", "test.validated", config={"table": 5}, on_failure="continue"),
        step("good_config", "test.validated", config={"table": "t"}),
    )

    outcome = await h.run(spec)

    reasons = {sid: [a.error_reason for a in o.attempts] for sid, o in outcome.steps.items()}
    assert reasons == {
        "nope": ["UNKNOWN_PROCESSOR"],
        "bad_config": ["INVALID_STEP_CONFIG"],
        "good_config": [""],
    }
    assert outcome.state == "COMPLETED"


async def test_disabled_step_is_skipped_and_dependents_run() -> None:
    h = Harness()
    spec = pipeline(step("a"), step("b", enabled=False), step("c"))

    outcome = await h.run(spec)

    assert outcome.state == "COMPLETED"
    b = outcome.steps["b"]
    assert b.state == "SKIPPED" and b.outputs == {"status": "SKIPPED"} and b.attempts == []
    assert h.states("b") == ["SKIPPED"] and h.events[h.order("b", "SKIPPED")].attempt == 0
    assert [c[0] for c in h.ok.calls] == ["a", "c"]
    assert h.ok.calls[1][3]["b"] == {"status": "SKIPPED"}


async def test_outputs_of_earlier_steps_are_visible_and_read_only() -> None:
    prepared: dict[str, Steps] = {}

    def prepare(spec: StepSpec, steps: Steps) -> PreparedStep:
        prepared[spec.step_id] = steps
        config = dict(spec.config)
        if spec.step_id == "transform":
            config["source"] = steps["extract"]["table"]
        return PreparedStep(config, True)

    h = Harness()
    spec = pipeline(
        step("extract", config={"outputs": {"table": "raw_usage", "rows_written": 7}}),
        step("transform"),
        step("side", depends_on=[]),
    )

    outcome = await h.run(spec, prepare)

    assert outcome.state == "COMPLETED"
    assert outcome.steps["extract"].outputs == {"status": "SUCCESS", "table": "raw_usage", "rows_written": 7}
    calls = {c[0]: c for c in h.ok.calls}
    assert calls["transform"][2] == {"source": "raw_usage"}
    assert calls["transform"][3]["extract"]["table"] == "raw_usage"
    assert "transform" not in prepared["transform"]
    snapshot = prepared["transform"]
    with pytest.raises(TypeError):
        cast(dict[str, Any], snapshot)["extract"] = {}
    with pytest.raises(TypeError):
        cast(dict[str, Any], snapshot["extract"])["table"] = "other"
    assert outcome.steps["extract"].outputs["table"] == "raw_usage"


async def test_failing_event_callback_does_not_break_the_run() -> None:
    h = Harness()

    def explode(event: StepEvent) -> None:
        raise RuntimeError("sink down")

    outcome = await h.runner.run(
        pipeline(step("a"), step("b")), prepare=default_prepare, make_context=make_context, on_event=explode
    )

    assert outcome.state == "COMPLETED"


def test_per_run_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="per_run_limit"):
        StepRunner(Registry({}), global_limit=asyncio.Semaphore(1), per_run_limit=0)


# -- spec validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([step("a", depends_on=["b"]), step("b", depends_on=["a"])], "dependency cycle: a -> b -> a"),
        ([step("a", depends_on=["c"]), step("b"), step("c")], "dependency cycle: a -> c -> b -> a"),
        ([step("a"), step("b", depends_on=["zz"])], "step 'b' depends on unknown step 'zz'"),
        ([step("a", depends_on=["a"])], "step 'a' depends on itself"),
    ],
)
def test_spec_rejects_cycles_and_unknown_dependencies(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        pipeline(*steps)


def test_spec_dependencies_default_to_the_previous_step() -> None:
    spec = pipeline(
        step("a", depends_on=["c"]), step("b", depends_on=[]), step("c"), step("d", depends_on=["a", "a"])
    )

    assert spec.dependencies() == {"a": ("c",), "b": (), "c": ("b",), "d": ("a",)}
