"""A decrypted provider credential as processors see it: the secret fields never show in a repr or str."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

MASK = "**********"


class Credential:
    """One org's credential for one provider, decrypted for the step that asked for it.

    `secret(field)` gives a `SecretStr` (its repr and str are masked; `.get_secret_value()` reveals it);
    `value(field)` gives a non-secret field (for example `billing_export_table`). `reveal()` returns every
    field in the clear, for libraries that need the whole document (a Google service-account JSON).
    Neither `repr`, `str`, pickling nor an f-string shows a secret value.
    """

    __slots__ = ("_fields", "_secret_names", "id", "name", "org_slug", "provider", "version")

    def __init__(
        self,
        *,
        id: str,
        org_slug: str,
        provider: str,
        name: str,
        version: int,
        fields: Mapping[str, Any],
        secret_fields: frozenset[str],
    ) -> None:
        self.id = id
        self.org_slug = org_slug
        self.provider = provider
        self.name = name
        self.version = version
        self._secret_names = secret_fields
        self._fields = {
            k: SecretStr(v) if k in secret_fields and isinstance(v, str) else v for k, v in fields.items()
        }

    @property
    def field_names(self) -> list[str]:
        """The names of the fields present, sorted."""
        return sorted(self._fields)

    def secret(self, field: str) -> SecretStr:
        """A secret field (KeyError if it is absent or not secret)."""
        value = self._fields[field]
        if not isinstance(value, SecretStr):
            raise KeyError(f"{field} is not a secret field")
        return value

    def value(self, field: str, default: Any = None) -> Any:
        """A non-secret field (KeyError if it is secret)."""
        value = self._fields.get(field, default)
        if isinstance(value, SecretStr):
            raise KeyError(f"{field} is a secret field: use secret()")
        return value

    def reveal(self) -> dict[str, Any]:
        """Every field in the clear. Hand it straight to the library that needs it; never log it."""
        return {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in self._fields.items()}

    def secret_values(self) -> list[str]:
        """The clear values of the secret fields (for redaction)."""
        return [v.get_secret_value() for v in self._fields.values() if isinstance(v, SecretStr)]

    def __repr__(self) -> str:
        return (
            f"Credential(id={self.id!r}, provider={self.provider!r}, name={self.name!r}, "
            f"version={self.version}, fields={self.field_names})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Credential cannot be pickled")
