"""`generic.noop`: does no work; optionally waits, then returns the outputs it was given.

Useful as a barrier or placeholder step, and to measure the engine's own overhead.

```yaml
- step_id: settle
  ps_type: generic.noop
  config:
    sleep_seconds: 2          # optional; cancellable
    outputs: {window: "{{ start_date }}"}
```
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from processors.base import StepContext, Templated, parse_config


class Config(BaseModel):
    """The step's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sleep_seconds: Annotated[float, Field(ge=0)] | Templated = 0.0
    outputs: dict[str, Any] = Field(default_factory=dict)


class Noop:
    """Waits, then succeeds."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Sleep `sleep_seconds`, then return SUCCESS with `outputs`."""
        config = parse_config(Config, step_config)
        if isinstance(config.sleep_seconds, float) and config.sleep_seconds > 0:
            await asyncio.sleep(config.sleep_seconds)
        return {"status": "SUCCESS", **config.outputs}


def get_engine() -> Noop:
    """The processor object the engine calls."""
    return Noop()
