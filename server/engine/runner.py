"""The async step engine: runs one pipeline's steps in dependency order with limits, timeouts and retries.

Order. A step whose `depends_on` is omitted depends on the step listed before it (the first step on
nothing); `depends_on: []` means no dependency and a list names the steps it waits for
(`PipelineSpec.dependencies()`). A step starts once all its dependencies have reached a terminal state,
whatever that state is: skipped and `on_failure: continue` failures do not hold dependents back.
Independent steps run concurrently, at most `per_run_limit` attempts of one run at a time and at most
as many attempts of all runs as `global_limit` (a semaphore shared by every run) allows. Both slots are
held only while an attempt executes, never while a step waits for its dependencies or a backoff.

One step.
    1. `prepare(step, steps)` renders the config and decides `enabled`, seeing the outputs of the steps
       finished so far. A disabled step is SKIPPED with outputs `{"status": "SKIPPED"}`. If `prepare`,
       the processor lookup or the processor's `Config` validation raises, the step is FAILED (reason
       from a `ServiceError`), without retry; the failure is recorded as attempt 1.
    2. Each attempt takes the two slots, emits RUNNING, builds its `StepContext` with
       `make_context(step, attempt, steps)` (attempts count from 1) and awaits the processor under
       `asyncio.timeout(step.timeout)` when the step has a timeout.
    3. The processor's dict is the step's outputs (`steps[step_id]` for later steps). Status SUCCESS is
       SUCCEEDED, SKIPPED is SKIPPED, FAILED is FAILED (error from `outputs["error"]`), anything else
       is FAILED with reason INVALID_PROCESSOR_RESULT. `rows_written` comes from `outputs["rows_written"]`
       when it is an int.
    4. A `TransientError` or the step's own timeout is retried while attempts remain
       (`retry.max_attempts`): a RETRYING event, then a sleep of
       `min(initial * multiplier ** (attempt - 1), max)` seconds, times `0.5 + random() / 2` when
       `retry.jitter` is set. When attempts run out the step is FAILED, or TIMEOUT after a timeout.
       Any other exception fails the step at once: a `ServiceError` gives its `message` and `reason`,
       anything else only its class name and reason PROCESSOR_ERROR (an exception's text or traceback
       may hold secrets, so it is never reported nor logged).

Failures. A FAILED or TIMEOUT step with `on_failure: continue` leaves the run going (it may still be
COMPLETED). With `on_failure: fail` (the default) the run stops: its other steps in progress are
cancelled (CANCELLED), the steps that have not started become NOT_RUN, and the run is FAILED with an
error naming the step.

Cancellation. When the task awaiting `run()` is cancelled (a cancel request or the pipeline timeout),
the steps in progress are cancelled at once, even in the middle of a processor call or a backoff:
concurrent steps run as tasks of their own, and the only step that can run runs in the calling task
itself (no task per step in a sequential pipeline), where a processor that swallows the
cancellation does not keep the run going. Steps in progress become CANCELLED, steps not started
NOT_RUN, and the CancelledError is re-raised once they have finished. Only this run's own steps are
ever cancelled.

Events. `on_event` is called synchronously on every state change. Per step: RUNNING (attempt n), then
RETRYING (the failed attempt n, with its error) and RUNNING (n + 1) for each retry, then exactly one
terminal event (SUCCEEDED, FAILED, SKIPPED, TIMEOUT, CANCELLED or NOT_RUN); a step cancelled during
a backoff goes from RETRYING to CANCELLED. Steps that never start (disabled, failing in `prepare`,
NOT_RUN) emit only the terminal event. A terminal event's
`duration_ms` spans the step from its first RUNNING; a RETRYING event's spans the failed attempt. An
exception raised by `on_event` is logged and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal

from processors.base import Processor, StepContext
from server.engine.processor import ProcessorRegistry
from server.errors import ServiceError, TransientError
from server.pipelines.spec import PipelineSpec, RetryPolicy, StepSpec

logger = logging.getLogger(__name__)

StepState = Literal[
    "PENDING", "RUNNING", "RETRYING", "SUCCEEDED", "FAILED", "SKIPPED", "TIMEOUT", "CANCELLED", "NOT_RUN"
]
RunState = Literal["COMPLETED", "FAILED"]
Steps = Mapping[str, Mapping[str, Any]]

TERMINAL: Final[frozenset[str]] = frozenset(
    {"SUCCEEDED", "FAILED", "SKIPPED", "TIMEOUT", "CANCELLED", "NOT_RUN"}
)
FAILURES: Final[frozenset[str]] = frozenset({"FAILED", "TIMEOUT"})
_PROCESSOR_STATUSES: Final[dict[str, StepState]] = {
    "SUCCESS": "SUCCEEDED",
    "FAILED": "FAILED",
    "SKIPPED": "SKIPPED",
}


@dataclass(frozen=True, slots=True)
class StepEvent:
    """A step's state change, emitted through `on_event`.

    Attributes:
        step_id: The step.
        state: Its new state.
        attempt: The attempt the event belongs to (0 when the step never ran an attempt).
        at: When the change happened (UTC).
        error: What went wrong, for RETRYING and the failure states.
        error_reason: A stable reason code for `error`.
        duration_ms: The failed attempt's duration for RETRYING; the whole step's for terminal states.
        rows_written: The processor's `rows_written` output, when it gave one.
        attempt_started_at: When the attempt that this event ends started: set on RETRYING and on a
            terminal event that ends an attempt (not on one after a backoff, nor on a step that
            never ran an attempt), so each attempt is reported as ended exactly once.
    """

    step_id: str
    state: StepState
    attempt: int
    at: datetime
    error: str = ""
    error_reason: str = ""
    duration_ms: int = 0
    rows_written: int = 0
    attempt_started_at: datetime | None = None


@dataclass(slots=True)
class StepAttempt:
    """One attempt of a step, a row of the run ledger.

    Attributes:
        step_id: The step.
        attempt: The attempt number, from 1.
        state: The attempt's own result: RUNNING while it runs, then SUCCEEDED, SKIPPED, FAILED
            (also for a transient error that was retried), TIMEOUT or CANCELLED.
        started_at: When the attempt started (UTC).
        ended_at: When it ended; None while it runs.
        error: What went wrong.
        error_reason: A stable reason code for `error`.
        rows_written: The processor's `rows_written` output.
        outputs: The dict the processor returned ({} when it raised).
    """

    step_id: str
    attempt: int
    state: StepState
    started_at: datetime
    ended_at: datetime | None
    error: str
    error_reason: str
    rows_written: int
    outputs: dict[str, Any]


@dataclass(slots=True)
class StepOutcome:
    """Where a step ended up.

    Attributes:
        step_id: The step.
        ps_type: Its processor type.
        state: Its final state (PENDING, RUNNING or RETRYING only while the run is in progress).
        attempts: Its attempts, in order.
        outputs: Its outputs as later steps see them; `{"status": "FAILED", "error": ...}` when the
            processor raised or timed out, {} when the step was cancelled or never ran.
        error: What went wrong, "" on success.
    """

    step_id: str
    ps_type: str
    state: StepState
    attempts: list[StepAttempt] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class PreparedStep:
    """A step's config with its templates rendered, and whether it runs.

    Attributes:
        config: The config passed to the processor.
        enabled: False skips the step (its dependents still run).
    """

    config: dict[str, Any]
    enabled: bool


@dataclass(slots=True)
class RunOutcome:
    """Where a run ended up.

    Attributes:
        state: COMPLETED unless a step with `on_failure: fail` failed.
        steps: Every step's outcome, in pipeline order.
        error: Which step failed the run and why; "" when COMPLETED.
    """

    state: RunState
    steps: dict[str, StepOutcome]
    error: str


PrepareFn = Callable[[StepSpec, Steps], PreparedStep]
MakeContextFn = Callable[[StepSpec, int, Steps], StepContext]
EventFn = Callable[[StepEvent], None]


@dataclass(frozen=True, slots=True)
class _AttemptResult:
    state: StepState
    outputs: dict[str, Any]
    error: str = ""
    reason: str = ""
    retryable: bool = False


class StepRunner:
    """Runs pipelines' steps; one instance serves many concurrent runs."""

    def __init__(
        self,
        registry: ProcessorRegistry,
        *,
        global_limit: asyncio.Semaphore,
        per_run_limit: int = 4,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """Create a runner.

        Args:
            registry: Where processors are found by ps_type.
            global_limit: Caps the attempts executing at once across every run sharing it.
            per_run_limit: Caps the attempts executing at once within one run.
            sleep: Awaited with the backoff delay in seconds between attempts.
            random: A number in [0, 1) for the backoff jitter.

        Raises:
            ValueError: If `per_run_limit` is below 1.
        """
        if per_run_limit < 1:
            raise ValueError("per_run_limit must be at least 1")
        self._registry = registry
        self._global = global_limit
        self._per_run_limit = per_run_limit
        self._sleep = sleep
        self._random = random

    async def run(
        self,
        spec: PipelineSpec,
        *,
        prepare: PrepareFn,
        make_context: MakeContextFn,
        on_event: EventFn,
    ) -> RunOutcome:
        """Run every step of `spec` and report how each ended.

        Args:
            spec: The validated pipeline.
            prepare: Renders a step's config from the finished steps' outputs; may raise
                `InvalidInputError`, which fails the step without retry.
            make_context: Builds the processor's context for a step and attempt number (from 1).
            on_event: Called synchronously on every step state change.

        Returns:
            The run's state and every step's outcome.

        Raises:
            asyncio.CancelledError: When the calling task is cancelled, after this run's steps have
                been cancelled and marked CANCELLED or NOT_RUN.
        """
        return await _Run(self, spec, prepare, make_context, on_event).execute()

    def backoff(self, policy: RetryPolicy, attempt: int) -> float:
        """The delay in seconds after failed attempt `attempt` (from 1) under `policy`."""
        b = policy.backoff
        delay = min(b.initial * b.multiplier ** (attempt - 1), b.max)
        if policy.jitter:
            delay *= 0.5 + self._random() / 2
        return float(delay)


def _now() -> datetime:
    return datetime.now(UTC)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _rows(outputs: Mapping[str, Any]) -> int:
    value = outputs.get("rows_written")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


MAX_ERROR = 500
_NOTHING = contextlib.nullcontext()  # in place of a semaphore or a timeout a run or step does not need
UNEXPECTED = "unexpected error in the step (details in the server log by run id)"


def _describe(exc: Exception, default_reason: str) -> tuple[str, str]:
    """Error text (at most MAX_ERROR characters) and reason safe to report on a run: a domain error's
    message, never its operator detail, an unexpected exception's message or its class name (those go
    to the server log, with the run and step ids)."""
    if isinstance(exc, ServiceError):
        if exc.detail:
            logger.warning("step error %s: %s (%s)", exc.reason, exc.message, exc.detail)
        return _clip(exc.message), exc.reason
    # Its type and where it was raised, not its message: a library's message may carry a secret.
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "?"
    logger.warning("unexpected step error %s at %s", type(exc).__name__, where)
    return UNEXPECTED, default_reason


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


class _Run:
    """The state of one `StepRunner.run` call."""

    def __init__(
        self,
        runner: StepRunner,
        spec: PipelineSpec,
        prepare: PrepareFn,
        make_context: MakeContextFn,
        on_event: EventFn,
    ) -> None:
        self._runner = runner
        self._steps = {s.step_id: s for s in spec.steps}
        self._deps = spec.dependencies()
        self._prepare = prepare
        self._make_context = make_context
        self._on_event = on_event
        # A run with no more steps than its limit never waits for one of its slots: no semaphore to pass.
        limit = runner._per_run_limit
        self._slots: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(limit) if len(spec.steps) > limit else _NOTHING
        )
        self._outcomes = {s.step_id: StepOutcome(s.step_id, s.ps_type, "PENDING") for s in spec.steps}
        self._finished: dict[str, Mapping[str, Any]] = {}
        self._started: dict[str, float] = {}

    # -- scheduling -------------------------------------------------------------------------------------

    async def execute(self) -> RunOutcome:
        # A step is ready once none of its dependencies is unfinished. `blocking` counts them per step,
        # and a finished step readies its dependents: no scan of every waiting step per step, which made
        # a long chain quadratic.
        waiting = dict.fromkeys(self._steps)  # the steps not started, in pipeline order
        blocking = {step_id: len(deps) for step_id, deps in self._deps.items()}
        dependents: dict[str, list[str]] = {}
        for step_id, deps in self._deps.items():
            for dep in deps:
                dependents.setdefault(dep, []).append(step_id)
        order = {step_id: i for i, step_id in enumerate(self._steps)}
        ready = [step_id for step_id in waiting if not blocking[step_id]]
        tasks: dict[asyncio.Task[None], str] = {}
        failed_step = ""
        try:
            while True:
                for step_id in ready:
                    del waiting[step_id]
                if len(ready) == 1 and not tasks:
                    # The only step that can run (always so in a sequential pipeline): run it in this
                    # task; cancelling the run reaches it just the same, without a task per step.
                    step_id = ready[0]
                    await self._run_step(step_id)
                    _raise_if_cancelled()  # a processor may have swallowed the run's cancellation
                    if waiting:  # steps that never wait still let the loop serve others between them
                        await asyncio.sleep(0)
                    done_ids = [step_id]
                else:
                    for step_id in ready:
                        task = asyncio.create_task(self._run_step(step_id), name=f"step:{step_id}")
                        tasks[task] = step_id
                    if not tasks:
                        break
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    done_ids = []
                    for task in done:
                        done_ids.append(tasks.pop(task))
                        task.result()  # a bug in the runner itself: stop the run below
                ready = []
                for step_id in done_ids:
                    outcome = self._outcomes[step_id]
                    fatal = outcome.state in FAILURES and self._steps[step_id].on_failure == "fail"
                    if fatal and not failed_step:
                        failed_step = step_id
                    if step_id in self._finished:  # what its dependents wait for (not CANCELLED, NOT_RUN)
                        for dependent in dependents.get(step_id, ()):
                            blocking[dependent] -= 1
                            if not blocking[dependent]:
                                ready.append(dependent)
                if failed_step:
                    break
                ready.sort(key=order.__getitem__)  # started in pipeline order
        except BaseException as exc:
            await _cancel_and_wait(tasks)
            if isinstance(exc, asyncio.CancelledError):
                self._interrupt("run cancelled", "RUN_CANCELLED")
            else:
                self._interrupt("internal error", "INTERNAL")
            raise
        if failed_step:
            interrupted = await _cancel_and_wait(tasks)
            self._interrupt(f"step {failed_step!r} failed", "RUN_FAILED")
            if interrupted:
                raise asyncio.CancelledError
            failed = self._outcomes[failed_step]
            return RunOutcome("FAILED", self._outcomes, f"step {failed_step!r} failed: {failed.error}")
        if waiting:  # only reachable for a spec built without validation (a dependency cycle)
            self._interrupt("unresolvable dependencies", "DEPENDENCY_CYCLE")
            return RunOutcome(
                "FAILED", self._outcomes, "steps with unresolvable dependencies: " + ", ".join(waiting)
            )
        return RunOutcome("COMPLETED", self._outcomes, "")

    def _interrupt(self, error: str, reason: str) -> None:
        """Mark every step not yet terminal: CANCELLED if it started, else NOT_RUN, in pipeline order."""
        for step_id, outcome in self._outcomes.items():
            if outcome.state in TERMINAL:
                continue
            now = _now()
            if outcome.state == "PENDING":
                self._finish(step_id, "NOT_RUN", {}, error, reason)
                continue
            if outcome.attempts and outcome.attempts[-1].ended_at is None:
                row = outcome.attempts[-1]
                row.state, row.ended_at, row.error, row.error_reason = "CANCELLED", now, error, reason
            self._finish(step_id, "CANCELLED", {}, error, reason)

    # -- one step ----------------------------------------------------------------------------------------

    async def _run_step(self, step_id: str) -> None:
        step = self._steps[step_id]
        try:
            prepared = self._prepare(step, self._snapshot())
            if not prepared.enabled:
                self._finish(step_id, "SKIPPED", {"status": "SKIPPED"}, "", "")
                return
            processor = self._runner._registry.get(step.ps_type)
            self._runner._registry.validate_config(step.ps_type, prepared.config)
        except Exception as exc:
            error, reason = _describe(exc, "INTERNAL")
            logger.warning("step %s could not be prepared: %s (%s)", step_id, reason, type(exc).__name__)
            now = _now()
            row = StepAttempt(step_id, 1, "FAILED", now, now, error, reason, 0, {})
            self._outcomes[step_id].attempts.append(row)
            self._finish(step_id, "FAILED", {"status": "FAILED", "error": error}, error, reason)
            return

        policy = step.retry
        attempt = 0
        while True:
            attempt += 1
            began = time.monotonic()
            result = await self._attempt(step, processor, prepared.config, attempt)
            if result.retryable and attempt < policy.max_attempts:
                delay = self._runner.backoff(policy, attempt)
                self._outcomes[step_id].state = "RETRYING"
                took = _ms(time.monotonic() - began)
                started_at = self._outcomes[step_id].attempts[-1].started_at
                self._emit(
                    StepEvent(
                        step_id, "RETRYING", attempt, _now(), result.error, result.reason, took, 0, started_at
                    )
                )
                await self._runner._sleep(delay)
                continue
            outputs = result.outputs or {"status": "FAILED", "error": result.error}
            self._finish(step_id, result.state, outputs, result.error, result.reason)
            return

    async def _attempt(
        self, step: StepSpec, processor: Processor, config: dict[str, Any], n: int
    ) -> _AttemptResult:
        step_id = step.step_id
        outcome = self._outcomes[step_id]
        async with self._slots, self._runner._global:
            row = StepAttempt(step_id, n, "RUNNING", _now(), None, "", "", 0, {})
            outcome.attempts.append(row)
            outcome.state = "RUNNING"
            self._started.setdefault(step_id, time.monotonic())
            self._emit(StepEvent(step_id, "RUNNING", n, row.started_at))
            result = await self._call(step, processor, config, n)
        row.state, row.ended_at, row.outputs = result.state, _now(), result.outputs
        row.error, row.error_reason = result.error, result.reason
        row.rows_written = _rows(result.outputs)
        return result

    async def _call(
        self, step: StepSpec, processor: Processor, config: dict[str, Any], n: int
    ) -> _AttemptResult:
        # A step without a timeout of its own pays for no Timeout object (the run's timeout still holds).
        deadline = asyncio.timeout(step.timeout) if step.timeout is not None else None
        try:
            context = self._make_context(step, n, self._snapshot())
            async with deadline or _NOTHING:
                raw: object = await processor.execute(dict(config), context)
        except TimeoutError as exc:
            if deadline is not None and deadline.expired():
                return _AttemptResult(
                    "TIMEOUT", {}, f"step timed out after {step.timeout:g}s", "STEP_TIMEOUT", True
                )
            return self._raised(exc)
        except Exception as exc:
            return self._raised(exc)
        return _result(raw)

    @staticmethod
    def _raised(exc: Exception) -> _AttemptResult:
        error, reason = _describe(exc, "PROCESSOR_ERROR")
        return _AttemptResult("FAILED", {}, error, reason, retryable=isinstance(exc, TransientError))

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _snapshot(self) -> Steps:
        return MappingProxyType(dict(self._finished))

    def _finish(
        self, step_id: str, state: StepState, outputs: dict[str, Any], error: str, reason: str
    ) -> None:
        outcome = self._outcomes[step_id]
        # The last attempt ends with this event unless a RETRYING event already ended it.
        last = outcome.attempts[-1] if outcome.attempts and outcome.state != "RETRYING" else None
        outcome.state, outcome.outputs, outcome.error = state, dict(outputs), error
        if state not in ("CANCELLED", "NOT_RUN"):
            self._finished[step_id] = MappingProxyType(dict(outputs))
        started = self._started.get(step_id)
        duration = _ms(time.monotonic() - started) if started is not None else 0
        attempt = outcome.attempts[-1].attempt if outcome.attempts else 0
        self._emit(
            StepEvent(
                step_id,
                state,
                attempt,
                _now(),
                error,
                reason,
                duration,
                _rows(outputs),
                last.started_at if last else None,
            )
        )

    def _emit(self, event: StepEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            logger.exception("on_event failed for step %s (%s)", event.step_id, event.state)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation of the current task that its code caught and did not re-raise."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _result(raw: object) -> _AttemptResult:
    """Judge what a processor returned."""
    status = raw.get("status") if isinstance(raw, Mapping) else None
    state = _PROCESSOR_STATUSES.get(status) if isinstance(status, str) else None
    if state is None or not isinstance(raw, Mapping):
        error = "processor returned no dict with status SUCCESS, FAILED or SKIPPED"
        return _AttemptResult("FAILED", {}, error, "INVALID_PROCESSOR_RESULT")
    outputs = {str(k): v for k, v in raw.items()}
    if state == "FAILED":
        reported = outputs.get("error")
        error = _clip(str(reported)) if reported else "processor reported a failure"
        return _AttemptResult("FAILED", outputs, error, "PROCESSOR_FAILED")
    return _AttemptResult(state, outputs)


async def _cancel_and_wait(tasks: Mapping[asyncio.Task[None], str]) -> bool:
    """Cancel `tasks` and wait until all have finished.

    Returns:
        True if the calling task was itself cancelled meanwhile (the caller should re-raise).
    """
    for task in tasks:
        task.cancel()
    interrupted = False
    pending = set(tasks)
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
            for task in pending:
                task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("step task %s failed", tasks[task], exc_info=task.exception())
    return interrupted
