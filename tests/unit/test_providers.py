"""The provider registry: the shipped file validates, unknown keys are rejected, base URLs are overridden
from the environment, and credential documents are checked field by field without echoing values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server import devstack
from server.errors import InvalidInputError, NotFoundError
from server.providers import ApiKeyHeaderAuth, ProviderRegistry
from server.settings import PROJECT_ROOT, Settings

SHIPPED = PROJECT_ROOT / "configs" / "system" / "providers.yml"


def test_the_shipped_registry() -> None:
    registry = ProviderRegistry.load(SHIPPED, environ={})
    assert {"openai", "anthropic", "gcp", "generic"} <= {p.id for p in registry}
    anthropic = registry.get("anthropic")
    assert isinstance(anthropic.auth, ApiKeyHeaderAuth) and anthropic.auth.header == "x-api-key"
    assert anthropic.headers["anthropic-version"] == "2023-06-01"
    for pid in ("openai", "anthropic"):
        fields = registry.get(pid).credential.fields
        assert fields["admin_api_key"].required and fields["admin_api_key"].secret
    gcp = registry.get("gcp").credential.fields
    assert gcp["private_key"].secret and not gcp["billing_export_table"].required


def test_base_url_override_from_the_environment() -> None:
    registry = ProviderRegistry.load(SHIPPED, environ={"PROVIDER_BASE_URL_OPENAI": "http://127.0.0.1:9999"})
    assert registry.get("openai").base_url == "http://127.0.0.1:9999"
    assert registry.get("anthropic").base_url == "https://api.anthropic.com"


def test_unknown_keys_and_bad_values_are_rejected(tmp_path: Path) -> None:
    document = yaml.safe_load(SHIPPED.read_text())
    document["providers"]["openai"]["rate_limit"] = {"rpm": 1}  # a typo of rate_limits
    path = tmp_path / "providers.yml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(InvalidInputError) as caught:
        ProviderRegistry.load(path, environ={})
    assert caught.value.reason == "INVALID_PROVIDER_REGISTRY"
    assert "providers.openai.rate_limit" in caught.value.message
    document = yaml.safe_load(SHIPPED.read_text())
    document["providers"]["openai"]["auth"] = {"scheme": "bearer", "field": "api_key"}
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(InvalidInputError, match="does not declare"):
        ProviderRegistry.load(path, environ={})
    with pytest.raises(InvalidInputError, match="http"):
        ProviderRegistry.load(SHIPPED, environ={"PROVIDER_BASE_URL_OPENAI": "ftp://x"})


def test_credential_documents_are_validated_without_echoing_values() -> None:
    registry = ProviderRegistry.load(SHIPPED, environ={})
    assert registry.validate_credential("openai", {"admin_api_key": "sk-admin-abcdefgh12"}) == {
        "admin_api_key": "sk-admin-abcdefgh12"
    }
    with pytest.raises(InvalidInputError) as missing:
        registry.validate_credential("openai", {"api_key": "sk-admin-verysecret"})
    assert {(v.field, v.description) for v in missing.value.violations} == {
        ("api_key", "unknown field"),
        ("admin_api_key", "required"),
    }
    assert "verysecret" not in missing.value.message
    with pytest.raises(InvalidInputError) as malformed:
        registry.validate_credential("anthropic", {"admin_api_key": "not-a-key-verysecret"})
    assert malformed.value.violations[0].field == "admin_api_key"
    assert "verysecret" not in malformed.value.message
    with pytest.raises(InvalidInputError):
        registry.validate_credential("openai", ["sk-admin-x"])
    with pytest.raises(NotFoundError) as unknown:
        registry.validate_credential("openaii", {})
    assert unknown.value.reason == "UNKNOWN_PROVIDER" and "openaii" in unknown.value.message


def test_make_run_prints_how_to_add_a_credential() -> None:
    demo = {"org_slug": "demo", "dataset": "demo_local", "api_key": "ca_x"}
    text = devstack.banner(Settings(pipeline_env="local"), demo, "http://127.0.0.1:8001")
    assert "pipeline-service credentials set demo openai --from-file -" in text
    assert "credentials test demo openai" in text and "the local key" in text
