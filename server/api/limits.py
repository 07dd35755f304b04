"""The size limits of every request field, checked before authentication and before any work is done.

Each RPC's request message has an entry for every string, repeated and map field (a unit test keeps the
table complete as the contracts grow; the proto comments and the README repeat the numbers). Strings are
counted in characters; a violation says how long the value was, never what it was. Envoy adds the
transport limits in front: a 1 MiB body and 8 KiB of request headers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.errors import FieldViolation, InvalidInputError

_PACKAGE = "cloudact.pipeline.v1."


@dataclass(frozen=True, slots=True)
class Limit:
    """How large one field may be: characters of a string (or of each element / map value), entries of a
    repeated or map field, and characters of each map key."""

    chars: int = 0
    items: int = 0
    key_chars: int = 0


SEGMENT = Limit(64)  # a path segment: org slug, provider, domain, pipeline, procedure name
DAY = Limit(10)  # YYYY-MM-DD
TOKEN = Limit(512)  # an opaque page token
RUN_ID = Limit(64)

LIMITS: Mapping[str, Mapping[str, Limit]] = {
    "ListPipelinesRequest": {"page_token": TOKEN, "provider": SEGMENT},
    "RunPipelineRequest": {
        "org_slug": SEGMENT,
        "provider": SEGMENT,
        "domain": SEGMENT,
        "pipeline": SEGMENT,
        "date": DAY,
        "start_date": DAY,
        "end_date": DAY,
        "parameters": Limit(chars=1024, items=50, key_chars=64),
        "request_id": Limit(128),
    },
    "GetPipelineRunRequest": {"run_id": RUN_ID},
    "ListPipelineRunsRequest": {"pipeline": Limit(194), "status": Limit(32), "page_token": TOKEN},
    "CancelPipelineRunRequest": {"run_id": RUN_ID},
    "WatchPipelineRunRequest": {"run_id": RUN_ID},
    "ListSchedulesRequest": {"org_slug": SEGMENT},
    "UpdateScheduleRequest": {
        "org_slug": SEGMENT,
        "provider": SEGMENT,
        "domain": SEGMENT,
        "pipeline": SEGMENT,
        "cron": Limit(128),
        "timezone": SEGMENT,
        "parameters": Limit(chars=1024, items=50, key_chars=64),
    },
    "DeleteScheduleRequest": {
        "org_slug": SEGMENT,
        "provider": SEGMENT,
        "domain": SEGMENT,
        "pipeline": SEGMENT,
    },
    "CreateBackfillRequest": {
        "org_slug": SEGMENT,
        "pipeline": Limit(194),
        "start_date": DAY,
        "end_date": DAY,
    },
    "GetBackfillRequest": {"org_slug": SEGMENT, "backfill_id": RUN_ID},
    "CancelBackfillRequest": {"org_slug": SEGMENT, "backfill_id": RUN_ID},
    "TriggerSchedulerRequest": {},
    "GetNotificationSettingsRequest": {"org_slug": SEGMENT},
    "UpdateNotificationSettingsRequest": {
        "org_slug": SEGMENT,
        "recipients": Limit(chars=254, items=20),
        "slack_webhook_url": Limit(512),
        "events": Limit(chars=32, items=4),
        "pipelines": Limit(items=100),
    },
    "PipelineNotifications": {
        "pipeline": Limit(194),
        "events": Limit(chars=32, items=4),
        "recipients": Limit(chars=254, items=20),
    },
    "ListNotificationsRequest": {"org_slug": SEGMENT, "page_token": TOKEN},
    "GetSchedulerStatusRequest": {},
    "ListProceduresRequest": {"page_token": TOKEN},
    "GetProcedureRequest": {"name": Limit(128)},
    "SyncProceduresRequest": {"names": Limit(chars=128, items=200), "domain": SEGMENT},
    "DeleteProcedureRequest": {"name": Limit(128)},
    "ExecuteMigrationRequest": {"name": Limit(128), "dataset": Limit(128)},
}

Check = Callable[[Message], list[FieldViolation]]
ValueCheck = Callable[[Any], list[FieldViolation]]  # the check of one field's value


def _too_long(field: str, value: str, limit: int) -> FieldViolation | None:
    if len(value) <= limit:
        return None
    return FieldViolation(field, f"at most {limit} characters (got {len(value)})")


def _field_check(field: FieldDescriptor, limit: Limit) -> ValueCheck:
    name = field.name
    if field.message_type is not None and field.message_type.GetOptions().map_entry:

        def check_map(entries: Mapping[str, str]) -> list[FieldViolation]:
            if len(entries) > limit.items:
                return [FieldViolation(name, f"at most {limit.items} entries (got {len(entries)})")]
            found = []
            for i, (key, value) in enumerate(entries.items()):
                bad = _too_long(f"{name}[#{i}].key", key, limit.key_chars) or _too_long(
                    f"{name}[#{i}].value", value, limit.chars
                )
                if bad:
                    found.append(bad)
            return found

        return check_map
    if field.message_type is not None and field.is_repeated:
        element = _violations(field.message_type)

        def check_messages(values: list[Message]) -> list[FieldViolation]:
            if len(values) > limit.items:
                return [FieldViolation(name, f"at most {limit.items} entries (got {len(values)})")]
            return [
                FieldViolation(f"{name}[{i}].{v.field}", v.description)
                for i, value in enumerate(values)
                for v in element(value)
            ]

        return check_messages
    if field.is_repeated:

        def check_list(values: list[str]) -> list[FieldViolation]:
            if len(values) > limit.items:
                return [FieldViolation(name, f"at most {limit.items} entries (got {len(values)})")]
            return [v for i, s in enumerate(values) if (v := _too_long(f"{name}[{i}]", s, limit.chars))]

        return check_list

    def check_string(value: str) -> list[FieldViolation]:
        bad = _too_long(name, value, limit.chars)
        return [bad] if bad else []

    return check_string


def needs_limit(field: FieldDescriptor) -> bool:
    """Whether a field can grow without bound (strings, bytes, repeated and map fields)."""
    return field.is_repeated or field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _violations(message_type: Descriptor) -> Check:
    """The field checks of one message type (a request, or the element of a repeated message field, whose
    type has its own entry); KeyError if a field has no declared limit. Only the fields a message has set
    are looked at (`ListFields`: an empty string, list or map is within every limit)."""
    declared: Mapping[str, Limit] = LIMITS.get(message_type.full_name.removeprefix(_PACKAGE), {})
    checks: dict[str, ValueCheck] = {}
    for field in message_type.fields:
        if needs_limit(field):
            if field.name not in declared:
                raise KeyError(f"{message_type.full_name}.{field.name} has no size limit")
            checks[field.name] = _field_check(field, declared[field.name])

    def violations(message: Message) -> list[FieldViolation]:
        found: list[FieldViolation] = []
        for field, value in message.ListFields():
            check = checks.get(field.name)
            if check is not None:
                found += check(value)
        return found

    return violations


def checker(request_type: Descriptor) -> Callable[[Message], None]:
    """The check of one request type; KeyError at registration if a field has no declared limit."""
    violations_of = _violations(request_type)

    def check(request: Any) -> None:
        violations = violations_of(request)
        if violations:
            raise InvalidInputError(
                "request fields exceed their size limits", violations, reason="REQUEST_TOO_LARGE"
            )

    return check
