"""The processor contract and the registry that finds processors by `ps_type`.

A processor is a module `processors/{provider}/{domain}.py` (ps_type `{provider}.{domain}`) exposing
`get_engine()`. The returned object has `async execute(step_config, context) -> dict` whose `status` is
`SUCCESS`, `FAILED` or `SKIPPED`, plus outputs that later steps read as `steps.<step_id>.<key>`. It may
declare `Config`, a pydantic model that validates the step's `config` when the pipeline is loaded.
Processors reach the outside only through the `StepContext` they are given.

Only modules inside the `processors` package can be loaded: a ps_type is two lowercase identifiers, so
no dotted path, relative import or file name ever reaches `importlib`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, StringConstraints, ValidationError

from server.errors import FieldViolation, InvalidInputError

if TYPE_CHECKING:
    from server.warehouse.bigquery import BigQueryWarehouse

PS_TYPE = re.compile(r"^([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)$")
PACKAGE = "processors"

StepStatus = Literal["SUCCESS", "FAILED", "SKIPPED"]


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """Which run a step belongs to."""

    run_id: str
    org_slug: str
    dataset: str
    pipeline_id: str
    pipeline_key: str


@dataclass(frozen=True)
class StepContext:
    """Everything a processor may use: identity, resolved parameters, earlier results, adapters."""

    run: RunIdentity
    step_id: str
    attempt: int
    parameters: Mapping[str, Any]
    steps: Mapping[str, Mapping[str, Any]]
    warehouse: BigQueryWarehouse
    meta_dataset: str
    log: logging.LoggerAdapter[logging.Logger]
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def start_date(self) -> date | None:
        """The run window's first day, when the run has one."""
        value = self.parameters.get("start_date")
        return date.fromisoformat(value) if isinstance(value, str) and value else None

    @property
    def end_date(self) -> date | None:
        """The run window's last day, when the run has one."""
        value = self.parameters.get("end_date")
        return date.fromisoformat(value) if isinstance(value, str) and value else None


@runtime_checkable
class Processor(Protocol):
    """What `get_engine()` returns."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Run the step; return `{"status": ..., **outputs}`."""
        ...


ModelT = TypeVar("ModelT", bound=BaseModel)

# A config value that is still a template at load time (`"{{ start_date }}"`); resolved before the step runs.
Templated = Annotated[str, StringConstraints(pattern=r"(\{\{|\{%)")]


def parse_config(model: type[ModelT], step_config: dict[str, Any]) -> ModelT:
    """Validate a step's resolved config with the processor's model; InvalidInputError names the fields."""
    try:
        return model.model_validate(step_config)
    except ValidationError as exc:
        raise InvalidInputError(
            "invalid step config",
            [FieldViolation("config." + ".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()],
            reason="INVALID_STEP_CONFIG",
        ) from exc


def _module_name(ps_type: str) -> str:
    match = PS_TYPE.fullmatch(ps_type)
    if match is None:
        raise InvalidInputError(
            f"invalid ps_type {ps_type!r}",
            [FieldViolation("ps_type", "must be provider.domain")],
            reason="UNKNOWN_PROCESSOR",
        )
    return f"{PACKAGE}.{match.group(1)}.{match.group(2)}"


class ProcessorRegistry:
    """Loads processors by ps_type from the `processors` package, once each."""

    def __init__(self) -> None:
        self._loaded: dict[str, Processor] = {}

    def get(self, ps_type: str) -> Processor:
        """The processor for `ps_type`; InvalidInputError if there is none."""
        if ps_type in self._loaded:
            return self._loaded[ps_type]
        name = _module_name(ps_type)
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            raise InvalidInputError(
                f"no processor for ps_type {ps_type!r}",
                [FieldViolation("ps_type", f"no module {name}")],
                reason="UNKNOWN_PROCESSOR",
            ) from exc
        factory = getattr(module, "get_engine", None)
        engine = factory() if callable(factory) else None
        if not isinstance(engine, Processor):
            raise InvalidInputError(
                f"{name}.get_engine() does not return a processor",
                [FieldViolation("ps_type", "get_engine() missing or wrong")],
                reason="UNKNOWN_PROCESSOR",
            )
        self._loaded[ps_type] = engine
        return engine

    def validate_config(self, ps_type: str, config: dict[str, Any]) -> None:
        """Validate a step's raw config with the processor's `Config` model, if it declares one.

        The model sees the config before templates are resolved, so a field that may hold a template
        must accept a string; the engine validates again with the resolved values before the step runs.
        """
        model = getattr(self.get(ps_type), "Config", None)
        if model is None or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return
        parse_config(model, config)
