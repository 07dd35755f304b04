"""The pipeline config schema: `configs/{provider}/{domain}/{pipeline}.yml`, validated with unknown keys
rejected, so a typo fails at load time with the file and the field named.

Step order: a step whose `depends_on` is omitted depends on the step listed before it (the first on
nothing), `depends_on: []` means no dependency, and a list names its dependencies, earlier or later in
the file. Unknown steps, self-dependencies and cycles are rejected."""

from __future__ import annotations

import graphlib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from server.scheduler import cron

SEGMENT = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
Identifier = Annotated[str, StringConstraints(pattern=SEGMENT.pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Backoff(_Strict):
    """Exponential backoff between attempts."""

    initial: float = Field(1.0, gt=0)
    max: float = Field(60.0, gt=0)
    multiplier: float = Field(2.0, ge=1)


class RetryPolicy(_Strict):
    """How often a step is retried after a transient error."""

    max_attempts: int = Field(1, ge=1, le=20)
    backoff: Backoff = Backoff()
    jitter: bool = True


class Schedule(_Strict):
    """When the scheduler runs the pipeline."""

    cron: str
    timezone: str = "UTC"
    enabled: bool = True
    # After downtime: run the latest missed time once (true), or skip times missed by more than two
    # minutes (false).
    catch_up: bool = True
    # Runs of one scheduled time (or backfill day) at most: transient failures are retried with backoff.
    max_attempts: int = Field(3, ge=1, le=10)
    # The shortest gap an org's override may give this pipeline's schedule.
    min_interval_minutes: int = Field(60, ge=1, le=10080)
    # The org needs a credential of this provider for the default schedule to apply (issue-8's store).
    requires_credential: str = ""

    @model_validator(mode="after")
    def _valid(self) -> Schedule:
        cron.check_cron(self.cron)
        cron.timezone(self.timezone)
        return self


class StepSpec(_Strict):
    """One step: which processor runs it, with what config, after which steps."""

    step_id: Identifier
    ps_type: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")]
    description: str = ""
    depends_on: list[Identifier] | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(None, gt=0)
    retry: RetryPolicy = RetryPolicy()
    on_failure: Literal["fail", "continue"] = "fail"
    enabled: bool | str = True


class PipelineSpec(_Strict):
    """A whole pipeline config."""

    pipeline_id: Identifier
    name: str
    description: str = ""
    version: str = "1"
    timeout: float = Field(3600.0, gt=0)
    parameters: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    # The run window (`date`, or `start_date` + `end_date`, from the request's fields or its parameters):
    # at most this many days long, reaching at most this many days after today (UTC).
    max_window_days: int = Field(366, ge=1, le=3660)
    max_future_days: int = Field(0, ge=0, le=366)
    schedule: Schedule | None = None
    steps: list[StepSpec] = Field(min_length=1)

    @field_validator("steps")
    @classmethod
    def _unique_steps(cls, steps: list[StepSpec]) -> list[StepSpec]:
        seen: set[str] = set()
        for step in steps:
            if step.step_id in seen:
                raise ValueError(f"step_id {step.step_id!r} is used twice")
            seen.add(step.step_id)
        return steps

    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """Each step's effective dependencies, in step order.

        Returns:
            `depends_on` when it is given (duplicates dropped), else the previous step (none for the
            first step).
        """
        deps: dict[str, tuple[str, ...]] = {}
        previous: tuple[str, ...] = ()
        for step in self.steps:
            explicit = step.depends_on
            deps[step.step_id] = previous if explicit is None else tuple(dict.fromkeys(explicit))
            previous = (step.step_id,)
        return deps

    @model_validator(mode="after")
    def _known_dependencies(self) -> PipelineSpec:
        ids = {s.step_id for s in self.steps}
        for step in self.steps:
            for dep in step.depends_on or ():
                if dep not in ids:
                    raise ValueError(f"step {step.step_id!r} depends on unknown step {dep!r}")
                if dep == step.step_id:
                    raise ValueError(f"step {step.step_id!r} depends on itself")
        try:
            graphlib.TopologicalSorter(self.dependencies()).prepare()
        except graphlib.CycleError as exc:
            # graphlib lists the cycle as "a is needed by b"; reversed it reads "a depends on b".
            cycle: list[str] = list(reversed(exc.args[1]))
            raise ValueError("dependency cycle: " + " -> ".join(cycle)) from None
        return self
