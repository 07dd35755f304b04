"""The pipeline configs on disk: `configs/{provider}/{domain}/{pipeline}.yml`, loaded and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from server.engine.processor import ProcessorRegistry
from server.errors import FieldViolation, InvalidInputError, NotFoundError
from server.pipelines.spec import SEGMENT, PipelineSpec

# Folders under configs/ that hold other things than pipelines.
RESERVED = frozenset({"schemas", "system", "notifications"})


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """A validated config and where it came from."""

    provider: str
    domain: str
    pipeline: str
    path: Path
    spec: PipelineSpec

    @property
    def key(self) -> str:
        """`provider/domain/pipeline`."""
        return f"{self.provider}/{self.domain}/{self.pipeline}"


class ConfigError(InvalidInputError):
    """A config file is invalid; the violations name the file and the field."""


def load_config(path: Path, root: Path) -> PipelineConfig:
    """Load and validate one config file located at `root/{provider}/{domain}/{pipeline}.yml`."""
    rel = path.relative_to(root)
    parts = [*rel.parent.parts, rel.stem]
    if len(parts) != 3 or not all(SEGMENT.fullmatch(p) for p in parts) or path.suffix != ".yml":
        raise ConfigError(
            f"{rel}: must be {{provider}}/{{domain}}/{{pipeline}}.yml in lowercase snake_case",
            [FieldViolation(str(rel), "bad location")],
            reason="INVALID_PIPELINE_CONFIG",
        )
    try:
        data = yaml.safe_load(path.read_text())
        spec = PipelineSpec.model_validate(data)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{rel}: invalid YAML: {exc}",
            [FieldViolation(str(rel), "invalid YAML")],
            reason="INVALID_PIPELINE_CONFIG",
        ) from exc
    except ValidationError as exc:
        violations = [FieldViolation(f"{rel}:{'.'.join(map(str, e['loc']))}", e["msg"]) for e in exc.errors()]
        details = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise ConfigError(f"{rel}: {details}", violations, reason="INVALID_PIPELINE_CONFIG") from exc
    return PipelineConfig(parts[0], parts[1], parts[2], path, spec)


class PipelineCatalog:
    """Every pipeline config under a root folder, validated when the catalog is built."""

    def __init__(self, configs: list[PipelineConfig]) -> None:
        self._configs = {c.key: c for c in sorted(configs, key=lambda c: c.key)}

    @classmethod
    def load(cls, root: Path) -> PipelineCatalog:
        """Load every `*.yml` three levels below `root` (reserved folders skipped); stop at an error."""
        paths = [p for p in sorted(root.glob("*/*/*.yml")) if p.relative_to(root).parts[0] not in RESERVED]
        return cls([load_config(p, root) for p in paths])

    def check_processors(self, registry: ProcessorRegistry) -> None:
        """Every step's ps_type must name a processor whose `Config` accepts the step's config."""
        for config in self._configs.values():
            for index, step in enumerate(config.spec.steps):
                try:
                    registry.validate_config(step.ps_type, step.config)  # gets the processor first
                except InvalidInputError as exc:
                    rel = f"{config.key}.yml:steps.{index}"
                    raise ConfigError(
                        f"{rel}: {exc.message}: "
                        + "; ".join(f"{v.field}: {v.description}" for v in exc.violations),
                        [FieldViolation(f"{rel}.{v.field}", v.description) for v in exc.violations],
                        reason="INVALID_PIPELINE_CONFIG",
                    ) from exc

    def all(self) -> list[PipelineConfig]:
        """Every config, ordered by provider, domain and pipeline."""
        return list(self._configs.values())

    def get(self, provider: str, domain: str, pipeline: str) -> PipelineConfig:
        """One config by its path segments."""
        violations = [
            FieldViolation(name, "lowercase snake_case: letters, digits, underscores")
            for name, value in (("provider", provider), ("domain", domain), ("pipeline", pipeline))
            if not SEGMENT.fullmatch(value)
        ]
        if violations:
            raise InvalidInputError("invalid pipeline path", violations, reason="INVALID_PIPELINE_PATH")
        config = self._configs.get(f"{provider}/{domain}/{pipeline}")
        if config is None:
            raise NotFoundError(
                f"pipeline {provider}/{domain}/{pipeline} not found",
                reason="PIPELINE_NOT_FOUND",
                metadata={"pipeline": f"{provider}/{domain}/{pipeline}"},
            )
        return config
