"""`server.pipelines.catalog` and `spec`: configs on disk, validated with the file and the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import InvalidInputError, NotFoundError
from server.pipelines.catalog import ConfigError, PipelineCatalog, load_config
from server.pipelines.spec import PipelineSpec

REPO = Path(__file__).resolve().parents[2]

VALID = """\
pipeline_id: saas_monthly_cost
name: SaaS monthly cost
description: Monthly cost of every SaaS plan.
timeout: 600
parameters: {lookback_days: 3, currency: USD}
schedule: {cron: "0 4 * * *", timezone: Europe/Berlin}
steps:
  - step_id: extract
    ps_type: generic.procedure_executor
    config: {procedure: sp_extract}
    retry: {max_attempts: 3, backoff: {initial: 0.5}}
  - step_id: convert
    ps_type: generic.procedure_executor
    depends_on: [extract]
    on_failure: continue
    timeout: 30
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def violations(exc: InvalidInputError) -> list[str]:
    return [v.field for v in exc.violations]


def test_valid_config_loads(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID)
    catalog = PipelineCatalog.load(tmp_path)
    [config] = catalog.all()
    assert (config.provider, config.domain, config.pipeline, config.key) == (
        "saas",
        "costs",
        "monthly",
        "saas/costs/monthly",
    )
    assert config.path == tmp_path / "saas/costs/monthly.yml"
    spec = config.spec
    assert isinstance(spec, PipelineSpec)
    assert spec.pipeline_id == "saas_monthly_cost" and spec.timeout == 600
    assert spec.parameters == {"lookback_days": 3, "currency": "USD"}
    assert spec.schedule is not None and spec.schedule.timezone == "Europe/Berlin"
    extract, convert = spec.steps
    assert extract.retry.max_attempts == 3 and extract.retry.backoff.initial == 0.5
    assert extract.retry.backoff.max == 60.0  # defaults fill in
    assert convert.depends_on == ["extract"] and convert.on_failure == "continue"
    assert catalog.get("saas", "costs", "monthly") is config


def test_catalog_is_ordered_by_key(tmp_path: Path) -> None:
    for rel in ("zeta/a/p.yml", "alpha/b/q.yml", "alpha/a/r.yml"):
        write(tmp_path, rel, VALID)
    assert [c.key for c in PipelineCatalog.load(tmp_path).all()] == ["alpha/a/r", "alpha/b/q", "zeta/a/p"]


def test_unknown_key_is_rejected_with_file_and_field(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID.replace("on_failure: continue", "on_falure: continue"))
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert caught.value.reason == "INVALID_PIPELINE_CONFIG"
    assert violations(caught.value) == ["saas/costs/monthly.yml:steps.1.on_falure"]
    assert "saas/costs/monthly.yml" in caught.value.message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID + "owner: finops\n")
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/monthly.yml:owner"]


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID.replace("max_attempts: 3", "max_attempts: 99"))
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/monthly.yml:steps.0.retry.max_attempts"]


def test_config_error_is_invalid_input(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", "name: no id\n")
    with pytest.raises(InvalidInputError) as caught:
        PipelineCatalog.load(tmp_path)
    assert set(violations(caught.value)) == {
        "saas/costs/monthly.yml:pipeline_id",
        "saas/costs/monthly.yml:steps",
    }


def test_duplicate_step_ids(tmp_path: Path) -> None:
    write(
        tmp_path,
        "saas/costs/monthly.yml",
        VALID.replace("step_id: convert", "step_id: extract").replace("    depends_on: [extract]\n", ""),
    )
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/monthly.yml:steps"]
    assert "'extract' is used twice" in caught.value.message


def test_depends_on_unknown_step(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID.replace("depends_on: [extract]", "depends_on: [extrakt]"))
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert "depends on unknown step 'extrakt'" in caught.value.message
    assert all(f.startswith("saas/costs/monthly.yml:") for f in violations(caught.value))


def test_depends_on_itself(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", VALID.replace("depends_on: [extract]", "depends_on: [convert]"))
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert "depends on itself" in caught.value.message


def test_empty_steps_rejected(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/monthly.yml", "pipeline_id: p\nname: P\nsteps: []\n")
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/monthly.yml:steps"]


@pytest.mark.parametrize("rel", ["saas/monthly.yml", "saas/costs/deep/monthly.yml"])
def test_wrong_depth_is_a_bad_location(tmp_path: Path, rel: str) -> None:
    path = write(tmp_path, rel, VALID)
    with pytest.raises(ConfigError) as caught:
        load_config(path, tmp_path)
    assert violations(caught.value) == [rel]
    assert caught.value.violations[0].description == "bad location"


@pytest.mark.parametrize(
    "rel",
    [
        "SaaS/costs/monthly.yml",
        "saas/Costs/monthly.yml",
        "saas/costs/Monthly.yml",
        "saas/costs/monthly-cost.yml",
        "1saas/costs/monthly.yml",
    ],
)
def test_bad_segment_names_fail_the_catalog(tmp_path: Path, rel: str) -> None:
    write(tmp_path, rel, VALID)
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == [rel]
    assert caught.value.reason == "INVALID_PIPELINE_CONFIG"


def test_wrong_suffix_is_a_bad_location(tmp_path: Path) -> None:
    path = write(tmp_path, "saas/costs/monthly.yaml", VALID)
    with pytest.raises(ConfigError):
        load_config(path, tmp_path)


@pytest.mark.parametrize("text", ["steps: [\n", "a: b: c\n", "key: 'unterminated\n", "\t- bad indent\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    write(tmp_path, "saas/costs/monthly.yml", text)
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/monthly.yml"]
    assert caught.value.violations[0].description == "invalid YAML"


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    write(tmp_path, "saas/costs/monthly.yml", text)
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert caught.value.violations
    assert all(f.startswith("saas/costs/monthly.yml") for f in violations(caught.value))


def test_first_bad_file_fails_the_whole_catalog(tmp_path: Path) -> None:
    write(tmp_path, "saas/costs/good.yml", VALID)
    write(tmp_path, "saas/costs/bad.yml", VALID + "extra: 1\n")
    with pytest.raises(ConfigError) as caught:
        PipelineCatalog.load(tmp_path)
    assert violations(caught.value) == ["saas/costs/bad.yml:extra"]


@pytest.mark.parametrize("reserved", ["schemas", "system", "notifications"])
def test_reserved_folders_are_skipped(tmp_path: Path, reserved: str) -> None:
    write(tmp_path, f"{reserved}/meta/whatever.yml", "not: [a, pipeline\n")
    write(tmp_path, "saas/costs/monthly.yml", VALID)
    assert [c.key for c in PipelineCatalog.load(tmp_path).all()] == ["saas/costs/monthly"]


def test_files_outside_the_three_levels_are_not_loaded(tmp_path: Path) -> None:
    write(tmp_path, "README.yml", "x: 1\n")
    write(tmp_path, "saas/notes.yml", "x: 1\n")
    write(tmp_path, "saas/costs/monthly.json", "{}")
    assert PipelineCatalog.load(tmp_path).all() == []


def test_empty_root(tmp_path: Path) -> None:
    assert PipelineCatalog.load(tmp_path).all() == []


@pytest.fixture
def catalog(tmp_path: Path) -> PipelineCatalog:
    write(tmp_path, "saas/costs/monthly.yml", VALID)
    return PipelineCatalog.load(tmp_path)


@pytest.mark.parametrize(
    ("segments", "fields"),
    [
        (("..", "costs", "monthly"), ["provider"]),
        (("saas", "..", "monthly"), ["domain"]),
        (("saas", "costs", ".."), ["pipeline"]),
        (("SaaS", "Costs", "Monthly"), ["provider", "domain", "pipeline"]),
        (("saas", "costs/x", "monthly"), ["domain"]),
        (("", "costs", "monthly"), ["provider"]),
        (("saas", "costs", "monthly\n"), ["pipeline"]),
    ],
)
def test_get_rejects_bad_segments(
    catalog: PipelineCatalog, segments: tuple[str, str, str], fields: list[str]
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        catalog.get(*segments)
    assert caught.value.reason == "INVALID_PIPELINE_PATH"
    assert violations(caught.value) == fields


def test_get_unknown_is_not_found(catalog: PipelineCatalog) -> None:
    with pytest.raises(NotFoundError) as caught:
        catalog.get("saas", "costs", "weekly")
    assert caught.value.reason == "PIPELINE_NOT_FOUND"
    assert caught.value.metadata == {"pipeline": "saas/costs/weekly"}


def test_shipped_configs_load() -> None:
    catalog = PipelineCatalog.load(REPO / "configs")
    for config in catalog.all():
        assert config.path.is_relative_to(REPO / "configs")
        assert catalog.get(config.provider, config.domain, config.pipeline) is config


def test_test_configs_load() -> None:
    catalog = PipelineCatalog.load(REPO / "tests" / "data" / "configs")
    keys = [c.key for c in catalog.all()]
    assert keys == sorted(keys)
    assert {"demo/costs/monthly_cost", "demo/usage/daily_usage"} <= set(keys)
