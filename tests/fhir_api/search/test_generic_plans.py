"""Reused page statements keep their index paths when PostgreSQL plans them generically.

psycopg prepares a statement it runs often, and PostgreSQL may then plan it once
for any values. An index on an expression serves a generic plan only if the
query writes that expression exactly as the index does, constants included.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import psycopg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from bench.search import generic_plan
from fhir_api.search import repository
from fhir_api.search.parser import parse_search
from tests.fhir_api.search.helpers import caller_scope

BASE = "http://127.0.0.1:8000/fhir"


def _plan(
    session: Session,
    query: str,
    *,
    custom: bool = False,
    scope: repository.SearchScope = repository.UNRESTRICTED,
) -> str:
    """Return EXPLAIN of a search's reused first-page statement, planned generically by default."""
    resource_type, _, raw = query.partition("?")
    parsed = parse_search([resource_type], parse_qsl(raw), base_url=BASE)
    template = repository.first_page_template(
        criteria=parsed.criteria,
        sort=parsed.sort,
        limit=parsed.count + 1,
        scope=scope,
        walk_dates=repository.walks_dates(session, parsed.criteria, parsed.sort),
        walk_sort_dates=repository.walks_sort_dates(session, parsed.criteria, parsed.sort),
    )
    assert template is not None, "the search should reuse its page statement"
    # Any index over a scan of the table: the question is which conditions it takes.
    session.execute(text("SET LOCAL enable_seqscan = off"))
    return generic_plan(session.connection(), *template, custom=custom)


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


@pytest.mark.usefixtures("walks")
def test_a_units_walk_tests_its_rows_patients_by_hash_and_partial_index_in_a_generic_plan(
    session: Session,
) -> None:
    """A generic plan is blind to the unit's grantees: its patients must still be hashed."""
    query = "Observation?date=ge2031-03-01&date=lt2031-03-08&_sort=-date"
    plan = _plan(session, query, scope=caller_scope("unit-01"))
    assert "hashed SubPlan" in plan, plan
    assert "ix_fhir_resource_several_patients" in plan, plan


def test_a_units_sort_walk_is_reused_and_walks_the_date_index_in_a_generic_plan(
    session: Session,
) -> None:
    plan = _plan(session, "Observation?_sort=-date", scope=caller_scope("unit-01"))
    assert "ix_fhir_search_date_by_end" in plan, plan
    assert "hashed SubPlan" in plan, plan


def test_a_name_walks_type_and_parameter_are_written_into_its_generic_plan(
    session: Session,
) -> None:
    """Blind to them, a generic plan misjudged a common prefix and scanned it per entry."""
    plan = _plan(session, "Patient?name=bena", scope=caller_scope("unit-01"))
    walked = [line for line in plan.splitlines() if "Index Cond" in line and "bena" in line]
    assert walked, plan
    assert all("'Patient'::text" in line and "'name'::text" in line for line in walked), plan


def test_a_date_windows_instants_are_written_into_its_generic_plan(session: Session) -> None:
    """Blind to them, a plan cannot tell an open window from a day: it always sees them."""
    conditions = _range_conditions(_plan(session, WINDOW))
    assert conditions, WINDOW
    assert all("&&" in line and "2031-03-01" in line for line in conditions), conditions


def test_an_explain_that_fails_leaves_its_connection_able_to_explain_again(
    session: Session,
) -> None:
    """The bench explains many statements on one connection: a timeout must not end it."""
    # A connection that has run a statement often: psycopg prepared it, and
    # rolling a savepoint back then deallocates all of them, ours included.
    for _ in range(6):
        session.execute(text("SELECT 1"))
    session.execute(text("SET LOCAL statement_timeout = '100ms'"))
    slow = select(func.pg_sleep(1))
    with pytest.raises(psycopg.errors.QueryCanceled):
        generic_plan(session.connection(), slow, {}, analyze=True)
    session.execute(text("SET LOCAL statement_timeout = 0"))
    assert "cost=" in _plan(session, WINDOW)
