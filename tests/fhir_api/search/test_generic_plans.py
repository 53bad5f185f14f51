"""Reused page statements keep their index paths when PostgreSQL plans them generically.

psycopg prepares a statement it runs often, and PostgreSQL may then plan it once
for any values. An index on an expression serves a generic plan only if the
query writes that expression exactly as the index does, constants included.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

import psycopg
import pytest
from sqlalchemy.orm import Session

from fhir_api.search import repository
from fhir_api.search.parser import parse_search

BASE = "http://127.0.0.1:8000/fhir"


def _plan(session: Session, query: str, mode: str = "force_generic_plan") -> str:
    """Return EXPLAIN of a search's first-page template, planned generically by default."""
    resource_type, _, raw = query.partition("?")
    parsed = parse_search([resource_type], parse_qsl(raw), base_url=BASE)
    scope = repository.UNRESTRICTED
    limit = parsed.count + 1
    walk_dates = repository.walks_dates(session, parsed.criteria, parsed.sort)
    shape = repository._page_shape(
        parsed.criteria, parsed.sort, None, False, limit, scope, walk_dates
    )
    assert shape is not None, "the search should reuse its page statement"
    template = repository._page_template(
        shape, parsed.criteria, parsed.sort, None, False, limit, scope, walk_dates
    )
    values = repository._slot_values(parsed.criteria, parsed.sort, None)
    compiled = template.compile(session.get_bind())
    state = compiled.construct_expanded_state({**compiled.construct_params(_check=False), **values})
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", number, state.statement)
    arguments: list[Any] = [state.parameters[name] for name in names]
    driver = session.connection().connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    cursor = psycopg.ClientCursor(driver)
    cursor.execute(f"SET LOCAL plan_cache_mode = {mode}")
    # Any index over a scan of the table: the question is which conditions it takes.
    cursor.execute("SET LOCAL enable_seqscan = off")
    cursor.execute(f"PREPARE generic_page AS {sql}")
    try:
        slots = ", ".join(["%s"] * len(arguments))
        cursor.execute(f"EXPLAIN EXECUTE generic_page({slots})", arguments)
        return "\n".join(str(row[0]) for row in cursor.fetchall())
    finally:
        cursor.execute("DEALLOCATE generic_page")


def _range_conditions(plan: str) -> list[str]:
    return [line for line in plan.splitlines() if "Index Cond" in line and "tstzrange" in line]


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sorted date windows walk, whatever the test database's few rows would decide."""
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})


SORTED_WEEK = (
    "Encounter?service-provider=Organization/x&date=ge2031-03-01&date=lt2031-03-08&_sort=-date"
)
WINDOW = "Observation?subject=Patient/x&code=http://loinc.org|8480-6&date=ge2031-03-01"


@pytest.mark.usefixtures("walks")
def test_a_generic_plan_finds_the_periods_across_a_sorted_windows_edge_by_the_range_index(
    session: Session,
) -> None:
    plan = _plan(session, SORTED_WEEK)
    assert "ix_fhir_search_date_range" in plan, plan
    conditions = _range_conditions(plan)
    assert conditions, plan
    assert all("&&" in line for line in conditions), plan


def test_only_a_custom_plan_filters_a_date_window_by_the_range_index(session: Session) -> None:
    """A generic plan cannot tell an open window from a day: the keyed criteria drive it."""
    assert not any("&&" in line for line in _range_conditions(_plan(session, WINDOW))), WINDOW
    custom = _plan(session, WINDOW, "force_custom_plan")
    assert any("&&" in line for line in _range_conditions(custom)), custom
