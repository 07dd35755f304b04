"""The registry that finds processors by `ps_type` (the contract itself is `processors/base.py`).

A processor is a module `processors/{provider}/{domain}.py` (ps_type `{provider}.{domain}`) exposing
`get_engine()`. Only modules inside the `processors` package can be loaded: a ps_type is two lowercase
identifiers, so no dotted path, relative import or file name ever reaches `importlib`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from processors.base import Processor, parse_config
from server.errors import FieldViolation, InvalidInputError

PS_TYPE = re.compile(r"^([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)$")
PACKAGE = "processors"


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
    """Loads processors by ps_type from the `processors` package, once each.

    `extra_dirs` (setting `PROCESSOR_DIRS`, tests only) are folders laid out like `processors/`
    (`{provider}/{domain}.py`) added to the package's search path, as `CONFIGS_DIR` points at test
    pipelines: their modules are still named `processors.{provider}.{domain}`.
    """

    def __init__(self, extra_dirs: Sequence[Path] = ()) -> None:
        self._loaded: dict[str, Processor] = {}
        package = importlib.import_module(PACKAGE)
        for folder in extra_dirs:
            if str(folder) not in package.__path__:
                package.__path__.append(str(folder))

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
