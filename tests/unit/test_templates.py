"""`server.engine.templates`: date arithmetic, the helpers, rendering of nested config values, `enabled:`
parsing, every error case, and the run window of a RunPipeline request."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from server.engine.templates import (
    TemplateDate,
    TemplateError,
    parse_run_dates,
    render_bool,
    render_value,
    template_variables,
)
from server.errors import InvalidInputError

NOW = datetime(2024, 3, 1, 0, 30, tzinfo=UTC)
PATH = "steps.load.config.table"
STEPS: dict[str, dict[str, Any]] = {
    "extract": {
        "status": "SUCCESS",
        "rows_written": 1200,
        "tables": ["a", "b"],
        "items": 3,
        "meta": {"k": 1},
    },
}


def variables(
    parameters: Mapping[str, Any] | None = None,
    *,
    steps: Mapping[str, Mapping[str, Any]] | None = None,
    now: datetime = NOW,
) -> dict[str, Any]:
    return template_variables(
        parameters=parameters if parameters is not None else {"start_date": "2024-02-01", "currency": "USD"},
        org_slug="acme",
        run_id="run_123",
        dataset="acme_local",
        pipeline_id="daily_usage",
        steps=STEPS if steps is None else steps,
        now=now,
    )


def render(source: str, **kwargs: Any) -> Any:
    return render_value(source, variables(**kwargs), PATH)


def template_error(source: str, path: str = PATH, **kwargs: Any) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        render_value(source, variables(**kwargs), path)
    return info.value


def problem(error: TemplateError) -> str:
    assert len(error.violations) == 1
    return error.violations[0].description


# -- TemplateDate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "days", "expected"),
    [
        ("2024-02-28", 1, "2024-02-29"),  # leap day
        ("2024-02-29", 1, "2024-03-01"),
        ("2023-02-28", 1, "2023-03-01"),  # no leap day
        ("2024-03-01", -1, "2024-02-29"),
        ("2023-12-31", 1, "2024-01-01"),  # year boundary
        ("2025-01-01", -1, "2024-12-31"),
        ("2024-01-31", 30, "2024-03-01"),
        ("2024-05-10", 0, "2024-05-10"),
    ],
)
def test_template_date_adds_and_subtracts_days(start: str, days: int, expected: str) -> None:
    d = TemplateDate.fromisoformat(start)
    assert str(d + days) == expected
    assert str(days + d) == expected
    assert str(d - (-days)) == expected
    assert isinstance(d + days, TemplateDate)
    assert isinstance(d - days, TemplateDate)


def test_template_date_difference_is_int_days() -> None:
    assert TemplateDate(2024, 3, 1) - TemplateDate(2024, 2, 1) == 29
    assert TemplateDate(2024, 2, 1) - TemplateDate(2024, 3, 1) == -29
    assert TemplateDate(2025, 1, 1) - date(2024, 1, 1) == 366
    assert date(2025, 1, 1) - TemplateDate(2024, 1, 1) == 366  # __rsub__ wins over date.__sub__
    assert type(TemplateDate(2024, 1, 2) - TemplateDate(2024, 1, 1)) is int


def test_template_date_timedelta_str_and_equality() -> None:
    d = TemplateDate(2024, 2, 28)
    assert d + timedelta(days=2) == date(2024, 3, 1)
    assert isinstance(d - timedelta(days=1), TemplateDate)
    assert str(d) == "2024-02-28"
    assert f"{d}" == "2024-02-28"
    assert d == date(2024, 2, 28)
    assert TemplateDate.of(datetime(2024, 2, 28, 23, 59)) == d
    assert isinstance(TemplateDate.of(date(2024, 2, 28)), TemplateDate)


def test_template_date_rejects_bools_strings_and_overflow() -> None:
    d = TemplateDate(2024, 2, 28)
    with pytest.raises(TypeError):
        d + True
    with pytest.raises(TypeError):
        d - "1"  # type: ignore[operator]
    with pytest.raises(OverflowError, match="out of range"):
        d - 800_000
    with pytest.raises(OverflowError, match="out of range"):
        TemplateDate(9999, 12, 31) + 1


# -- date helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ month_start('2024-02-29') }}", "2024-02-01"),
        ("{{ month_end('2024-02-10') }}", "2024-02-29"),  # leap February
        ("{{ month_end('2023-02-10') }}", "2023-02-28"),
        ("{{ month_end('2000-02-01') }}", "2000-02-29"),  # divisible by 400: leap
        ("{{ month_end('1900-02-01') }}", "1900-02-28"),  # divisible by 100: not leap
        ("{{ month_end('2024-12-05') }}", "2024-12-31"),
        ("{{ month_end('2024-04-05') }}", "2024-04-30"),
        ("{{ year_start('2024-07-15') }}", "2024-01-01"),
        ("{{ add_days('2024-02-28', 1) }}", "2024-02-29"),
        ("{{ add_days('2024-03-01', -1) }}", "2024-02-29"),
        ("{{ add_days('2024-12-31', 1) }}", "2025-01-01"),
        ("{{ add_days('2024-01-01', '-1') }}", "2023-12-31"),  # an integer string works too
        ("{{ add_months('2025-01-31', 1) }}", "2025-02-28"),  # clamped to month end
        ("{{ add_months('2024-01-31', 1) }}", "2024-02-29"),  # clamped, leap year
        ("{{ add_months('2024-03-31', -1) }}", "2024-02-29"),
        ("{{ add_months('2024-05-31', 1) }}", "2024-06-30"),
        ("{{ add_months('2024-11-15', 2) }}", "2025-01-15"),  # over the year end
        ("{{ add_months('2025-01-15', -1) }}", "2024-12-15"),
        ("{{ add_months('2024-02-29', 12) }}", "2025-02-28"),
        ("{{ add_months('2024-02-29', -48) }}", "2020-02-29"),
        ("{{ add_months('2024-02-29', 0) }}", "2024-02-29"),
        ("{{ date('2024-02-28') + 1 }}", "2024-02-29"),
        ("{{ date('2024-03-01') - 1 }}", "2024-02-29"),
        ("{{ date('2024-03-01') - date('2024-01-01') }}", "60"),
        ("{{ date('2024-03-01T23:30:00+00:00') }}", "2024-03-01"),  # a timestamp counts as its day
        ("{{ date('2024-03-01T23:30:00-02:00') }}", "2024-03-02"),  # ... its UTC day
    ],
)
def test_helpers(source: str, expected: str) -> None:
    assert render(source) == expected


def test_helpers_accept_dates_and_timestamps_and_return_dates() -> None:
    assert render("{{ month_start(today) }}") == "2024-03-01"
    assert render("{{ month_end(yesterday) }}") == "2024-02-29"
    assert render("{{ month_start(now) }}") == "2024-03-01"  # `now` is an ISO timestamp string
    assert render("{{ month_start(start_date) }}") == "2024-02-01"
    assert render("{{ month_end(add_months(today, -1)) - 1 }}") == "2024-02-28"
    assert render("{{ add_days(month_start(today), 10).day }}") == "11"
    assert render("{{ date('2024-02-29').strftime('%Y%m%d') }}") == "20240229"


def test_today_yesterday_now_are_utc() -> None:
    assert (
        render("{{ today }}|{{ yesterday }}|{{ now }}") == "2024-03-01|2024-02-29|2024-03-01T00:30:00+00:00"
    )
    # 01:00 at UTC+02:00 is still the previous day in UTC
    east = datetime(2024, 3, 1, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert render("{{ today }} {{ now }}", now=east) == "2024-02-29 2024-02-29T23:00:00+00:00"
    # a naive clock is taken as UTC
    assert (
        render("{{ today }} {{ now }}", now=datetime(2025, 1, 1, 0, 0))
        == "2025-01-01 2025-01-01T00:00:00+00:00"
    )
    assert render("{{ today - yesterday }}") == "1"


# -- variables ------------------------------------------------------------------------------------


def test_identity_variables() -> None:
    assert (
        render("{{ org_slug }}/{{ run_id }}/{{ dataset }}/{{ pipeline_id }}")
        == "acme/run_123/acme_local/daily_usage"
    )


def test_parameters_top_level_and_as_namespace() -> None:
    params = {"start_date": "2024-02-28", "end_date": "2024-03-01", "currency": "USD", "limit": 5}
    v = variables(params)
    assert isinstance(v["start_date"], TemplateDate)
    assert v["currency"] == "USD"
    assert render_value("{{ start_date + 1 }}", v, PATH) == "2024-02-29"
    assert render_value("{{ parameters.end_date - 1 }}", v, PATH) == "2024-02-29"
    assert render_value("{{ end_date - start_date + 1 }} days", v, PATH) == "3 days"
    assert render_value("{{ parameters['currency'] }}-{{ limit * 2 }}", v, PATH) == "USD-10"


def test_only_iso_dates_become_dates() -> None:
    v = variables({"compact": "20240101", "week": "2024-W01-1", "bad": "2024-02-30", "day": "2024-02-29"})
    assert v["compact"] == "20240101"  # fromisoformat would accept these; an account id is not a date
    assert v["week"] == "2024-W01-1"
    assert v["bad"] == "2024-02-30"
    assert isinstance(v["day"], TemplateDate)


def test_builtin_names_win_over_parameters() -> None:
    v = variables({"dataset": "other_org_prod", "org_slug": "evil", "date": "2024-02-29"})
    assert render_value("{{ dataset }} {{ org_slug }}", v, PATH) == "acme_local acme"
    assert (
        render_value("{{ parameters.dataset }} {{ parameters.date + 1 }}", v, PATH)
        == "other_org_prod 2024-03-01"
    )
    assert render_value("{{ date('2024-01-01') }}", v, PATH) == "2024-01-01"


def test_steps_outputs() -> None:
    assert render("{{ steps.extract.rows_written }}") == "1200"
    assert render("{{ steps['extract']['status'] }}") == "SUCCESS"
    assert render("{{ steps.extract.tables | join(',') }}") == "a,b"
    assert render("{{ steps.extract.items }}") == "3"  # an output named like a dict method is the output
    assert render("{{ steps.extract.meta.k }}") == "1"
    assert render("{{ steps.extract.missing is defined }}") == "False"
    assert render("{{ steps | length }}") == "1"
    assert (
        render("{% for k in steps.extract | sort %}{{ k }} {% endfor %}")
        == "items meta rows_written status tables "
    )


# -- render_value ---------------------------------------------------------------------------------


def test_render_value_nested_dicts_and_lists() -> None:
    config = {
        "table": "usage_{{ start_date.strftime('%Y%m') }}",
        "batch": 500,
        "dry_run": False,
        "nothing": None,
        "{{ keys_are_not_rendered }}": "x",
        "queries": [
            {"sql": "SELECT {{ steps.extract.rows_written }}", "labels": ["{{ org_slug }}", 7]},
            "{{ today }}",
        ],
        "pair": ("{{ currency }}", 1),
    }
    assert render_value(config, variables(), "steps.load.config") == {
        "table": "usage_202402",
        "batch": 500,
        "dry_run": False,
        "nothing": None,
        "{{ keys_are_not_rendered }}": "x",
        "queries": [{"sql": "SELECT 1200", "labels": ["acme", 7]}, "2024-03-01"],
        "pair": ("USD", 1),
    }


def test_render_value_error_names_nested_path() -> None:
    config = {"queries": [{"sql": "ok"}, {"labels": ["fine", "{{ nope }}"]}]}
    with pytest.raises(TemplateError) as info:
        render_value(config, variables(), "steps.load.config")
    assert info.value.violations[0].field == "steps.load.config.queries[1].labels[1]"
    assert "steps.load.config.queries[1].labels[1]" in info.value.message
    assert "unknown name 'nope'" in problem(info.value)


def test_fast_path_returns_strings_untouched() -> None:
    for text in ["plain", "", "a }} b", "%} {", "{# not a template #}", "${not_ours}", "{ {x} }", "{ %"]:
        # no `{{` or `{%`: the very same object comes back, without parsing or needing any variable
        assert render_value(text, {}, PATH) is text
    assert render_value({"a": ["x", 1]}, {}, PATH) == {"a": ["x", 1]}


def test_results_are_strings_and_whitespace_is_kept() -> None:
    assert render("{{ 1 + 1 }}") == "2"
    assert render("{{ steps.extract.rows_written }}") == "1200"
    assert render("a\n{{ currency }}\n") == "a\nUSD\n"  # keep_trailing_newline
    assert render("<{{ '&' }}>") == "<&>"  # no autoescape
    assert render("{% if org_slug == 'acme' %}eu{% else %}us{% endif %}") == "eu"


# -- render_bool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["true", "True", "YES", "yes", "1", " true\n"])
def test_render_bool_true_words(word: str) -> None:
    assert render_bool(word, variables(), "steps.load.enabled") is True
    assert render_bool("{{ flag }}", variables({"flag": word}), "steps.load.enabled") is True


@pytest.mark.parametrize("word", ["false", "False", "NO", "no", "0", "  0 "])
def test_render_bool_false_words(word: str) -> None:
    assert render_bool(word, variables(), "steps.load.enabled") is False
    assert render_bool("{{ flag }}", variables({"flag": word}), "steps.load.enabled") is False


def test_render_bool_passes_bools_and_renders_expressions() -> None:
    assert render_bool(True, variables(), "steps.load.enabled") is True
    assert render_bool(False, variables(), "steps.load.enabled") is False
    assert render_bool("{{ steps.extract.rows_written > 0 }}", variables(), "steps.load.enabled") is True
    assert render_bool("{{ org_slug == 'other' }}", variables(), "steps.load.enabled") is False
    assert render_bool("{{ 'yes' if today.day == 1 else 'no' }}", variables(), "steps.load.enabled") is True


@pytest.mark.parametrize("value", ["maybe", "", "{{ currency }}", "{{ 2 }}", "on"])
def test_render_bool_rejects_other_words(value: str) -> None:
    with pytest.raises(TemplateError) as info:
        render_bool(value, variables(), "steps.load.enabled")
    assert info.value.violations[0].field == "steps.load.enabled"
    assert "true/false/yes/no/1/0" in problem(info.value)


def test_render_bool_template_error_names_path() -> None:
    with pytest.raises(TemplateError) as info:
        render_bool("{{ steps.missing.ok }}", variables(), "steps.load.enabled")
    assert info.value.violations[0].field == "steps.load.enabled"
    assert "unknown step 'missing'" in problem(info.value)


# -- errors ---------------------------------------------------------------------------------------


def test_template_error_is_invalid_input_with_reason() -> None:
    error = template_error("{{ nope }}")
    assert isinstance(error, InvalidInputError)
    assert error.reason == "TEMPLATE_ERROR"
    assert error.violations[0].field == PATH
    assert PATH in error.message


def test_unknown_variable() -> None:
    assert problem(template_error("{{ nope }}")) == "unknown name 'nope'"
    assert (
        problem(template_error("{{ strat_date }}"))
        == "unknown name 'strat_date' (did you mean 'start_date'?)"
    )
    assert problem(template_error("{{ today }} {{ nope + 1 }}")) == "unknown name 'nope'"


def test_unknown_parameter() -> None:
    assert "unknown parameter 'nope' (parameters: currency, start_date)" in problem(
        template_error("{{ parameters.nope }}")
    )


def test_unknown_step() -> None:
    assert (
        problem(template_error("{{ steps.load.rows }}"))
        == "unknown step 'load' (outputs are available from: extract)"
    )
    assert "no step outputs are available yet" in problem(
        template_error("{{ steps.extract.rows }}", steps={})
    )


def test_unknown_output_key() -> None:
    assert problem(template_error("{{ steps.extract.rows }}")).startswith(
        "step 'extract' has no output 'rows'"
    )
    assert "items, meta, rows_written, status, tables" in problem(template_error("{{ steps.extract.rows }}"))
    assert problem(template_error("{{ steps.extract.meta.x }}")).startswith(
        "steps.extract.meta has no key 'x'"
    )


def test_syntax_error_names_line() -> None:
    assert problem(template_error("{% if %}")).startswith("syntax error at line 1:")
    assert problem(template_error("ok\n{{ today }}\n{{ 1 + }}")).startswith("syntax error at line 3:")
    assert problem(template_error("{% for x in steps %}")).startswith("syntax error at line 1:")
    assert "No filter named 'shout'" in problem(template_error("{{ currency | shout }}"))


def test_unknown_function() -> None:
    assert problem(template_error("{{ foo(1) }}")) == "unknown function 'foo'"
    assert (
        problem(template_error("{{ month_strat(today) }}"))
        == "unknown function 'month_strat' (did you mean 'month_start'?)"
    )


def test_bad_date_strings() -> None:
    assert (
        problem(template_error("{{ date('2024-02-30') }}"))
        == "date(): '2024-02-30' is not an ISO date (YYYY-MM-DD)"
    )
    assert "is not an ISO date" in problem(template_error("{{ date('20240101') }}"))
    assert "is not an ISO date" in problem(template_error("{{ month_end('soon') }}"))
    assert "month_start(): expected a date" in problem(template_error("{{ month_start(5) }}"))
    assert "add_days(): 'x' is not a whole number of days" in problem(
        template_error("{{ add_days(today, 'x') }}")
    )
    assert "add_months(): 1.5 is not a whole number of months" in problem(
        template_error("{{ add_months(today, 1.5) }}")
    )
    assert "out of range" in problem(template_error("{{ add_months(today, 100000) }}"))
    assert "out of range" in problem(template_error("{{ add_days(today, -800000) }}"))
    assert "out of range" in problem(template_error("{{ today - 800000 }}"))


def test_helper_given_an_unknown_name() -> None:
    assert problem(template_error("{{ month_end(nope) }}")) == "unknown name 'nope'"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ today.__class__ }}",
        "{{ month_start.__globals__ }}",
        "{{ steps.extract.tables.append('x') }}",  # outputs are read-only
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_violations(source: str) -> None:
    assert problem(template_error(source)).startswith("refused by the sandbox:")
    assert STEPS["extract"]["tables"] == ["a", "b"]


def test_namespace_attributes_are_not_reachable() -> None:
    assert problem(template_error("{{ steps.__class__ }}")).startswith("unknown step '__class__'")
    assert problem(template_error("{{ parameters._data }}")).startswith("unknown parameter '_data'")


def test_function_rendered_without_call() -> None:
    assert "'month_end' is a function" in problem(template_error("{{ month_end }}"))
    # the run's `date` parameter is reachable, just not at top level
    message = problem(template_error("{{ date }}"))
    assert "'date' is a function" in message
    assert "parameters.date" in message


def test_evaluation_errors() -> None:
    assert problem(template_error("{{ 1 / 0 }}")) == "cannot evaluate: ZeroDivisionError: division by zero"
    assert "TypeError" in problem(template_error("{{ today + 'x' }}"))
    assert "month_start() missing 1 required positional argument" in problem(
        template_error("{{ month_start() }}")
    )
    assert "Range too big" in problem(template_error("{{ range(10 ** 9) | list }}"))


# -- parse_run_dates ------------------------------------------------------------------------------

TODAY = date(2025, 3, 1)


def run_window(
    date: str = "", start_date: str = "", end_date: str = "", today: date = TODAY
) -> dict[str, str]:
    return parse_run_dates(date=date, start_date=start_date, end_date=end_date, today=today)


def window_error(date: str = "", start_date: str = "", end_date: str = "") -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        run_window(date, start_date, end_date)
    assert not isinstance(info.value, TemplateError)
    assert info.value.reason == "INVALID_ARGUMENT"
    return info.value


def fields(error: InvalidInputError) -> set[str]:
    return {v.field for v in error.violations}


def test_run_window_neither() -> None:
    assert run_window() == {}


def test_run_window_single_date() -> None:
    assert run_window(date="2024-02-29") == {
        "date": "2024-02-29",
        "start_date": "2024-02-29",
        "end_date": "2024-02-29",
    }
    assert run_window(date="2025-03-01") == {
        "date": "2025-03-01",
        "start_date": "2025-03-01",
        "end_date": "2025-03-01",
    }


def test_run_window_start_and_end() -> None:
    assert run_window(start_date="2024-02-01", end_date="2024-02-29") == {
        "start_date": "2024-02-01",
        "end_date": "2024-02-29",
    }
    assert run_window(start_date="2024-02-01", end_date="2024-02-01") == {
        "start_date": "2024-02-01",
        "end_date": "2024-02-01",
    }


def test_run_window_of_366_days_is_allowed() -> None:
    assert run_window(start_date="2024-01-01", end_date="2024-12-31") == {  # a leap year: 366 days
        "start_date": "2024-01-01",
        "end_date": "2024-12-31",
    }
    assert run_window(start_date="2023-01-01", end_date="2024-01-01")["end_date"] == "2024-01-01"


def test_run_window_longer_than_366_days() -> None:
    error = window_error(start_date="2023-01-01", end_date="2024-01-02")
    assert fields(error) == {"start_date", "end_date"}
    assert "367 days" in error.violations[0].description
    assert fields(window_error(start_date="2020-01-01", end_date="2025-01-01")) == {"start_date", "end_date"}


def test_run_window_reversed() -> None:
    error = window_error(start_date="2024-03-01", end_date="2024-02-29")
    assert fields(error) == {"start_date", "end_date"}
    assert "is after end_date" in error.violations[0].description


def test_run_window_only_one_end() -> None:
    assert fields(window_error(start_date="2024-03-01")) == {"end_date"}
    assert fields(window_error(end_date="2024-03-01")) == {"start_date"}
    assert (
        "required when start_date is set" in window_error(start_date="2024-03-01").violations[0].description
    )


def test_run_window_date_with_start_or_end() -> None:
    assert fields(window_error(date="2024-03-01", start_date="2024-03-01")) == {"date", "start_date"}
    assert fields(window_error(date="2024-03-01", end_date="2024-03-01")) == {"date", "end_date"}
    error = window_error(date="2024-03-01", start_date="2024-03-01", end_date="2024-03-02")
    assert fields(error) == {"date", "start_date", "end_date"}
    assert "cannot be combined" in error.violations[0].description


@pytest.mark.parametrize(
    "bad", ["2024-02-30", "2023-02-29", "2024/01/01", "20240101", "2024-1-1", "yesterday", " 2024-01-01"]
)
def test_run_window_invalid_iso_dates(bad: str) -> None:
    assert fields(window_error(date=bad)) == {"date"}
    assert fields(window_error(start_date=bad, end_date="2024-03-01")) == {"start_date"}
    assert fields(window_error(start_date="2024-01-01", end_date=bad)) == {"end_date"}
    assert "is not an ISO date" in window_error(date=bad).violations[0].description


def test_run_window_future_dates() -> None:
    assert fields(window_error(date="2025-03-02")) == {"date"}
    assert fields(window_error(start_date="2025-02-01", end_date="2025-03-02")) == {"end_date"}
    assert "in the future" in window_error(date="2025-03-02").violations[0].description


def test_run_window_reports_every_bad_field_at_once() -> None:
    error = window_error(start_date="nope", end_date="2024-13-01")
    assert fields(error) == {"start_date", "end_date"}
    assert "start_date" in error.message and "end_date" in error.message
