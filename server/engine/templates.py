"""The one templating syntax of pipeline configs, resolved just before a processor runs.

Any string in a step's `config` (and a step's `enabled:`) may be a Jinja2 template. It is rendered in
a sandbox (`ImmutableSandboxedEnvironment`, a `SandboxedEnvironment` that also refuses to mutate
lists and dicts) with `StrictUndefined`, no file loader, autoescape off and trailing newlines kept.
A string is a template only when it contains `{{` or `{%`; every other string is used as written, and
every rendered result is a string (`"{{ 1 + 1 }}"` gives `"2"`). Dict keys are never rendered.

Names a template can use::

    parameters               the run's parameters: {{ parameters.currency }}
    <parameter>              each parameter also at top level: {{ start_date }}
    org_slug, run_id, dataset, pipeline_id
    steps                    earlier steps' outputs: {{ steps.extract.rows_written }}
    today, yesterday         dates (UTC, from the run's clock)
    now                      the run's clock as an ISO timestamp: 2025-03-01T06:00:00+00:00
    month_start(d)           first day of d's month
    month_end(d)             last day of d's month (29 in a leap February)
    year_start(d)            1 January of d's year
    add_days(d, n)           d moved by n days (n may be negative)
    add_months(d, n)         d moved by n months, the day clamped to the month's end
    date(s)                  an ISO date string ("2025-03-01") as a date

Parameters whose value is an ISO date (`YYYY-MM-DD`) are dates, like `today`. A date renders as its
ISO form and takes day arithmetic: `d + 1` and `d - 7` are dates, `d1 - d2` is a whole number of days.
The functions take dates or ISO strings (an ISO timestamp counts as its UTC day). Examples, for a
run on 2025-03-01 with `start_date` 2025-02-01 and `end_date` 2025-02-28::

    table: "usage_{{ start_date.strftime('%Y%m') }}"               -> usage_202502
    since: "{{ yesterday - 6 }}"                                    -> 2025-02-22
    from: "{{ month_start(add_months(today, -1)) }}"                -> 2025-02-01
    to: "{{ month_end(add_months(today, -1)) }}"                    -> 2025-02-28
    days: "{{ end_date - start_date + 1 }}"                         -> 28
    rows: "{{ steps.extract.rows_written }}"                        -> 1200
    enabled: "{{ parameters.full_refresh }}"                        -> true / false
    where: "{% if org_slug == 'acme' %}region = 'eu'{% else %}TRUE{% endif %}"

Built-in names win over parameters of the same name, so a run parameter can never redirect `dataset`
or `org_slug`; such a parameter (for instance the run's `date`) is still `parameters.date`.

Whatever goes wrong raises `TemplateError` (reason `TEMPLATE_ERROR`) whose field violation names the
config path being rendered (`steps.load.config.table`) and says what is wrong: an unknown name,
function, parameter, step or step output, a syntax error with its line, a bad date, or an operation
the sandbox refuses (`{{ ''.__class__ }}`).

`parse_run_dates` turns the run window of a RunPipeline request (`date`, or `start_date` and
`end_date`) into the `date` / `start_date` / `end_date` parameters.
"""

from __future__ import annotations

import calendar
import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, NoReturn, overload

from jinja2 import StrictUndefined, TemplateAssertionError, TemplateSyntaxError, nodes
from jinja2 import TemplateError as JinjaTemplateError
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing

from server.errors import FieldViolation, InvalidInputError

__all__ = [
    "TemplateDate",
    "TemplateError",
    "parse_run_dates",
    "render_bool",
    "render_value",
    "template_variables",
]

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_WHOLE_NUMBER = re.compile(r"^[+-]?\d{1,9}$")
_MAX_WINDOW_DAYS = 366
_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})
_RESERVED = frozenset(
    {
        "parameters", "org_slug", "run_id", "dataset", "pipeline_id", "steps", "today", "yesterday",
        "now", "month_start", "month_end", "year_start", "add_days", "add_months", "date",
    }
)  # fmt: skip


class TemplateError(InvalidInputError):
    """A config template could not be rendered; the violation names the field path and the problem."""

    default_reason = "TEMPLATE_ERROR"


class TemplateDate(date):
    """A date with day arithmetic for templates; `str()` is the ISO form.

    `d + n`, `n + d` and `d - n` (n whole days, or a timedelta) give a `TemplateDate`;
    `d - other_date` gives the number of days between them as an int.
    """

    __slots__ = ()

    @classmethod
    def of(cls, value: date) -> TemplateDate:
        """The `TemplateDate` of a date (the day of a datetime).

        Args:
            value: Any date or datetime.

        Returns:
            The same calendar day as a `TemplateDate`.
        """
        return cls(value.year, value.month, value.day)

    def _shift(self, days: int) -> TemplateDate:
        try:
            return TemplateDate.fromordinal(self.toordinal() + days)
        except (ValueError, OverflowError):
            raise OverflowError(
                f"{self} {'+' if days >= 0 else '-'} {abs(days)} days is out of range"
            ) from None

    def __add__(self, other: object) -> TemplateDate:
        if isinstance(other, int) and not isinstance(other, bool):
            return self._shift(other)
        if isinstance(other, timedelta):
            return self._shift(other.days)
        return NotImplemented

    __radd__ = __add__

    @overload  # type: ignore[override]
    def __sub__(self, other: date) -> int: ...

    @overload
    def __sub__(self, other: int | timedelta) -> TemplateDate: ...

    def __sub__(self, other: object) -> int | TemplateDate:
        # `date - date` is a timedelta for plain dates; templates want the number of days.
        if isinstance(other, datetime):
            return NotImplemented
        if isinstance(other, date):
            return self.toordinal() - other.toordinal()
        if isinstance(other, int) and not isinstance(other, bool):
            return self._shift(-other)
        if isinstance(other, timedelta):
            return self._shift(-other.days)
        return NotImplemented

    def __rsub__(self, other: object) -> int:
        if isinstance(other, date) and not isinstance(other, datetime):
            return other.toordinal() - self.toordinal()
        return NotImplemented

    def __str__(self) -> str:
        return self.isoformat()


class _BadValue(Exception):
    """A helper was given something it cannot use; becomes a TemplateError with the field path."""


def _parse_iso_date(text: str) -> TemplateDate | None:
    if not _ISO_DATE.fullmatch(text):
        return None
    try:
        return TemplateDate.of(date.fromisoformat(text))
    except ValueError:
        return None


def _as_date(value: object, function: str) -> TemplateDate:
    if isinstance(value, datetime):
        return TemplateDate.of(value.astimezone(UTC) if value.tzinfo else value)
    if isinstance(value, date):
        return TemplateDate.of(value)
    if isinstance(value, str):
        text = value.strip()
        parsed = _parse_iso_date(text)
        if parsed is not None:
            return parsed
        if _ISO_DATE.fullmatch(text[:10]) and len(text) > 10:
            try:
                return _as_date(datetime.fromisoformat(text), function)
            except ValueError:
                pass
        raise _BadValue(f"{function}(): {value!r} is not an ISO date (YYYY-MM-DD)")
    if isinstance(value, StrictUndefined):
        value._fail_with_undefined_error()
    raise _BadValue(f"{function}(): expected a date or an ISO date string, got {type(value).__name__}")


def _as_int(value: object, function: str, unit: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, StrictUndefined):
        value._fail_with_undefined_error()
    raise _BadValue(f"{function}(): {value!r} is not a whole number of {unit}")


def _month_start(d: object) -> TemplateDate:
    return _as_date(d, "month_start").replace(day=1)


def _month_end(d: object) -> TemplateDate:
    day = _as_date(d, "month_end")
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def _year_start(d: object) -> TemplateDate:
    return _as_date(d, "year_start").replace(month=1, day=1)


def _add_days(d: object, n: object) -> TemplateDate:
    day = _as_date(d, "add_days")
    try:
        return day + _as_int(n, "add_days", "days")
    except OverflowError as exc:
        raise _BadValue(f"add_days(): {exc}") from exc


def _add_months(d: object, n: object) -> TemplateDate:
    day = _as_date(d, "add_months")
    months = _as_int(n, "add_months", "months")
    year, month0 = divmod(day.year * 12 + day.month - 1 + months, 12)
    if not 1 <= year <= 9999:
        raise _BadValue(f"add_months(): {day} + {months} months is out of range")
    last = calendar.monthrange(year, month0 + 1)[1]
    return TemplateDate(year, month0 + 1, min(day.day, last))


def _date(s: object) -> TemplateDate:
    return _as_date(s, "date")


_HELPERS: dict[str, Callable[..., TemplateDate]] = {
    "month_start": _month_start,
    "month_end": _month_end,
    "year_start": _year_start,
    "add_days": _add_days,
    "add_months": _add_months,
    "date": _date,
}
for _name, _function in _HELPERS.items():
    # So that Python's own messages (wrong number of arguments) name the function as templates do.
    _function.__name__ = _function.__qualname__ = _name
del _name, _function
_HELPER_NAMES = {id(function): name for name, function in _HELPERS.items()}


class _Namespace(Mapping[str, Any]):
    """A read-only mapping whose missing keys are undefined with a message that says what is missing.

    Templates reach its entries only (`steps.extract`, `steps['extract']`), never its attributes, so
    an output key such as `items` or `keys` is the output, not a dict method.
    """

    __slots__ = ("_data", "_kind", "_label")

    def __init__(self, data: Mapping[str, Any], kind: str, label: str) -> None:
        self._data = data
        self._kind = kind
        self._label = label

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        if isinstance(value, Mapping) and not isinstance(value, _Namespace):
            if self._kind == "steps":
                return _Namespace(value, "step", key)
            label = f"steps.{self._label}.{key}" if self._kind == "step" else f"{self._label}.{key}"
            return _Namespace(value, "mapping", label)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(dict(self._data))

    def missing_message(self, key: object) -> str:
        """What to say when a template asks for a key this mapping does not have."""
        names = sorted(str(k) for k in self._data)
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        if self._kind == "steps":
            known = f"outputs are available from: {shown}" if names else "no step outputs are available yet"
            return f"unknown step {key!r} ({known})"
        if self._kind == "step":
            return f"step {self._label!r} has no output {key!r} (outputs: {shown or 'none'})"
        if self._kind == "parameters":
            return f"unknown parameter {key!r} (parameters: {shown or 'none'})"
        return f"{self._label} has no key {key!r} (keys: {shown or 'none'})"


class _Undefined(StrictUndefined):
    """StrictUndefined that calls an unknown top-level name what it is."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if not self._undefined_hint and self._undefined_obj is missing:
            return f"unknown name {self._undefined_name!r}"
        return str(super()._undefined_message)


def _finalize(value: Any) -> Any:
    if callable(value) and not isinstance(value, StrictUndefined):
        name = _HELPER_NAMES.get(id(value), getattr(value, "__name__", "value"))
        hint = f"; a parameter named {name!r} is parameters.{name}" if name in _RESERVED else ""
        raise _BadValue(f"{name!r} is a function: call it, e.g. {name}(...){hint}")
    return value


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, reading `_Namespace` entries by key only."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, _Namespace):
            return self._entry(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, _Namespace):
            return self._entry(obj, argument)
        return super().getitem(obj, argument)

    def _entry(self, namespace: _Namespace, key: Any) -> Any:
        try:
            return namespace[key]
        except (KeyError, TypeError):
            return self.undefined(hint=namespace.missing_message(key), obj=namespace, name=str(key))


_ENV = _Environment(
    undefined=_Undefined,
    autoescape=False,
    keep_trailing_newline=True,
    finalize=_finalize,
    loader=None,
)


@dataclass(frozen=True, slots=True)
class _Compiled:
    render: Callable[[Mapping[str, Any]], str]
    undeclared: frozenset[str]
    called: frozenset[str]


@lru_cache(maxsize=1024)
def _compile(source: str) -> _Compiled:
    tree = _ENV.parse(source)
    called = frozenset(
        call.node.name for call in tree.find_all(nodes.Call) if isinstance(call.node, nodes.Name)
    )
    template = _ENV.from_string(tree)
    return _Compiled(template.render, frozenset(find_undeclared_variables(tree)), called)


def _fail(path: str, problem: str, cause: BaseException | None = None) -> NoReturn:
    field = path or "<template>"
    raise TemplateError(f"cannot render {field}: {problem}", [FieldViolation(field, problem)]) from cause


def _unknown_name_problem(message: str, compiled: _Compiled, variables: Mapping[str, Any]) -> str:
    for name in sorted(compiled.undeclared):
        if message != f"unknown name {name!r}":
            continue
        close = difflib.get_close_matches(name, list(variables), n=1)
        what = "function" if name in compiled.called else "name"
        return f"unknown {what} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return message


def _render_string(source: str, variables: Mapping[str, Any], path: str) -> str:
    if "{{" not in source and "{%" not in source:
        return source
    try:
        compiled = _compile(source)
    except TemplateAssertionError as exc:  # parsed, but names no such filter or test
        _fail(path, f"invalid template at line {exc.lineno}: {exc.message}", exc)
    except TemplateSyntaxError as exc:
        _fail(path, f"syntax error at line {exc.lineno}: {exc.message}", exc)
    except JinjaTemplateError as exc:
        _fail(path, f"invalid template: {exc.message}", exc)
    try:
        return compiled.render(variables)
    except SecurityError as exc:
        _fail(path, f"refused by the sandbox: {exc.message}", exc)
    except UndefinedError as exc:
        _fail(path, _unknown_name_problem(str(exc.message), compiled, variables), exc)
    except _BadValue as exc:
        _fail(path, str(exc), exc)
    except TemplateError:
        raise
    except JinjaTemplateError as exc:
        _fail(path, str(exc.message), exc)
    except Exception as exc:  # the template's own expression failed (1 / 0, 'a' - 1, ...)
        _fail(path, f"cannot evaluate: {type(exc).__name__}: {exc}", exc)


def render_value(value: Any, variables: Mapping[str, Any], path: str) -> Any:
    """Render every template string inside a config value.

    Dicts and lists are walked recursively (dict keys are not rendered); strings without `{{` or
    `{%` and all non-string leaves are returned untouched. Rendered results are strings.

    Args:
        value: A config value: str, dict, list, tuple or any other leaf.
        variables: The names templates may use, from `template_variables`.
        path: The field path of `value` (`steps.load.config`), extended with `.key` and `[index]`
            for nested values and named in errors.

    Returns:
        A value of the same shape with every template rendered.

    Raises:
        TemplateError: A template is invalid or cannot be rendered; its violation names the path of
            the string that failed.
    """
    if isinstance(value, str):
        return _render_string(value, variables, path)
    if isinstance(value, Mapping):
        return {
            key: render_value(item, variables, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [render_value(item, variables, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(render_value(item, variables, f"{path}[{i}]") for i, item in enumerate(value))
    return value


def render_bool(value: bool | str, variables: Mapping[str, Any], path: str) -> bool:
    """Resolve a step's `enabled:`, a bool or a template that renders to a boolean word.

    Args:
        value: `True`/`False`, or a string rendering to true/false/yes/no/1/0 (any case, surrounding
            whitespace ignored).
        variables: The names templates may use, from `template_variables`.
        path: The field path (`steps.load.enabled`) named in errors.

    Returns:
        The boolean.

    Raises:
        TemplateError: The template fails, or its result is not one of the boolean words.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        _fail(path, f"must be a boolean or a template, got {type(value).__name__}")
    word = _render_string(value, variables, path).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    _fail(path, f"must render to true/false/yes/no/1/0, got {word!r}")


def _template_parameter(value: Any) -> Any:
    if isinstance(value, str):
        parsed = _parse_iso_date(value)
        if parsed is not None:
            return parsed
    return value


def template_variables(
    *,
    parameters: Mapping[str, Any],
    org_slug: str,
    run_id: str,
    dataset: str,
    pipeline_id: str,
    steps: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """The names a step's templates may use.

    Args:
        parameters: The run's resolved parameters; ISO date strings become `TemplateDate`s. Each is
            also a top-level name unless a built-in name has the same name.
        org_slug: The org running the pipeline.
        run_id: The run's id.
        dataset: The org's dataset.
        pipeline_id: The pipeline's id.
        steps: Outputs of the steps that have finished, by step id.
        now: The run's clock; a naive datetime is taken as UTC. `today`, `yesterday` and `now` derive
            from it.

    Returns:
        The variables for `render_value` and `render_bool`.
    """
    clock = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    today = TemplateDate.of(clock)
    params = {str(name): _template_parameter(value) for name, value in parameters.items()}
    variables: dict[str, Any] = {name: value for name, value in params.items() if name not in _RESERVED}
    variables.update(
        parameters=_Namespace(params, "parameters", "parameters"),
        org_slug=org_slug,
        run_id=run_id,
        dataset=dataset,
        pipeline_id=pipeline_id,
        steps=_Namespace(steps, "steps", "steps"),
        today=today,
        yesterday=today - 1,
        now=clock.isoformat(timespec="seconds"),
        **_HELPERS,
    )
    return variables


def parse_run_dates(
    *,
    date: str,
    start_date: str,
    end_date: str,
    today: date,
    max_days: int = _MAX_WINDOW_DAYS,
    future_days: int = 0,
) -> dict[str, str]:
    """Validate a RunPipeline request's run window and return it as parameters.

    `date` alone is a one-day window; `start_date` and `end_date` together are an inclusive window of
    at most `max_days` days; none of them means no window. No day may be more than `future_days` after
    `today`. Violations never repeat the value.

    Args:
        date: One day, `YYYY-MM-DD`, or "" (proto3's unset).
        start_date: The window's first day, or "".
        end_date: The window's last day, or "".
        today: The current UTC day.
        max_days: The longest window allowed (the pipeline's `max_window_days`).
        future_days: How many days after `today` a window may reach (the pipeline's `max_future_days`).

    Returns:
        `{"date": ..., "start_date": ..., "end_date": ...}` as ISO strings (`date` only when given),
        or `{}` when no field is set.

    Raises:
        InvalidInputError: A date is not a valid ISO date or lies after `today`, `date` is combined
            with `start_date`/`end_date`, only one of `start_date`/`end_date` is set, the window is
            reversed or longer than `max_days`. One violation per offending field.
    """
    given = {
        name: value
        for name, value in (("date", date), ("start_date", start_date), ("end_date", end_date))
        if value
    }
    if not given:
        return {}
    violations: list[FieldViolation] = []
    parsed: dict[str, TemplateDate] = {}
    latest = today + timedelta(days=future_days)
    for name, value in given.items():
        day = _parse_iso_date(value)
        if day is None:
            violations.append(FieldViolation(name, "is not an ISO date (YYYY-MM-DD)"))
        elif day > latest:
            allowed = f"today is {today.isoformat()}" + (
                f", at most {future_days} days ahead" if future_days else ""
            )
            violations.append(FieldViolation(name, f"{day} is in the future ({allowed})"))
        else:
            parsed[name] = day
    window = [name for name in ("start_date", "end_date") if name in given]
    if "date" in given and window:
        problem = "date cannot be combined with start_date/end_date"
        violations += [FieldViolation(name, problem) for name in ("date", *window)]
    elif len(window) == 1:
        absent = "end_date" if window[0] == "start_date" else "start_date"
        violations.append(FieldViolation(absent, f"required when {window[0]} is set"))
    if not violations and len(window) == 2:
        start, end = parsed["start_date"], parsed["end_date"]
        if start > end:
            problem = f"start_date {start} is after end_date {end}"
            violations += [FieldViolation("start_date", problem), FieldViolation("end_date", problem)]
        elif end - start + 1 > max_days:
            problem = f"the window {start}..{end} spans {end - start + 1} days, more than {max_days}"
            violations += [FieldViolation("start_date", problem), FieldViolation("end_date", problem)]
    if violations:
        raise InvalidInputError(
            "invalid run window: " + "; ".join(f"{v.field}: {v.description}" for v in violations), violations
        )
    if "date" in parsed:
        single = parsed["date"].isoformat()
        return {"date": single, "start_date": single, "end_date": single}
    return {"start_date": parsed["start_date"].isoformat(), "end_date": parsed["end_date"].isoformat()}
