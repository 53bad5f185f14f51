"""Searches sorted by the date they filter on walk that date's rows: same answers, in order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import ColumnElement, FromClause, and_, delete, func, not_, select, text
from sqlalchemy.orm import Session

from fhir_api.search import SearchScope, repository, search
from fhir_api.search.parser import parse_search
from fhir_api.search_index import single_valued
from tests.builders import patient
from tests.fhir_api.search.helpers import JSON, create, visit_encounter
from tests.fhir_api.search.helpers import search as get_bundle

BASE = "http://127.0.0.1:8000/fhir"
WINDOW = "date=ge2031-03-01&date=lt2031-04-01"


def _page_ids(bundle: JSON) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _link(bundle: JSON, relation: str) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == relation), None)


def _walk_pages(client: TestClient, url: str) -> tuple[list[str], list[str]]:
    """Follow next links to the end, then previous links back; return both orders."""
    forward: list[str] = []
    bundle = get_bundle(client, url)
    while True:
        forward += _page_ids(bundle)
        following = _link(bundle, "next")
        if following is None:
            break
        bundle = get_bundle(client, following)
    backward = _page_ids(bundle)
    while (preceding := _link(bundle, "previous")) is not None:
        bundle = get_bundle(client, preceding)
        backward = _page_ids(bundle) + backward
    return forward, backward


@pytest.fixture
def visits(client: TestClient) -> dict[str, Any]:
    """Encounters of two units in March 2031 (ties, an ongoing one), and two that never match."""
    unit_a = create(client, {"resourceType": "Organization", "name": "Walk A"})
    unit_b = create(client, {"resourceType": "Organization", "name": "Walk B"})
    subject = f"Patient/{create(client, patient('WALK1'))}"
    periods = {
        "early": ("2031-03-02T08:00:00Z", "2031-03-02T09:00:00Z", unit_a),
        "tie-1": ("2031-03-10T08:00:00Z", "2031-03-10T10:00:00Z", unit_a),
        "tie-2": ("2031-03-10T08:00:00Z", "2031-03-10T10:00:00Z", unit_b),
        "tie-3": ("2031-03-10T08:00:00Z", "2031-03-10T10:00:00Z", unit_a),
        "late": ("2031-03-28T14:00:00Z", "2031-03-28T15:00:00Z", unit_b),
        "ongoing": ("2031-03-20T08:00:00Z", None, unit_a),
        "spans-in": ("2031-02-20T08:00:00Z", "2031-03-03T08:00:00Z", unit_b),
    }
    made = {
        name: create(client, visit_encounter(subject, f"Organization/{unit}", start, end))
        for name, (start, end, unit) in periods.items()
    }
    create(client, visit_encounter(subject, f"Organization/{unit_a}", "2031-04-10T08:00:00Z", None))
    gone = create(
        client,
        visit_encounter(
            subject, f"Organization/{unit_a}", "2031-03-15T08:00:00Z", "2031-03-15T09:00:00Z"
        ),
    )
    assert client.delete(f"/fhir/Encounter/{gone}").status_code in (200, 204)
    ties = sorted(made[name] for name in ("tie-1", "tie-2", "tie-3"))
    # -date: the end of each period (an ongoing one has none: it sorts first).
    latest_first = [made["ongoing"], made["late"], *ties, made["spans-in"], made["early"]]
    # date: the start of each period.
    earliest_first = [made["spans-in"], made["early"], *ties, made["ongoing"], made["late"]]
    return {
        "made": made,
        "subject": subject,
        "unit_a": unit_a,
        "latest_first": latest_first,
        "earliest_first": earliest_first,
    }


def _walked(session: Session, query: str) -> bool:
    pairs = [(name, value) for name, _, value in (p.partition("=") for p in query.split("&"))]
    parsed = parse_search(["Encounter"], pairs, base_url=BASE)
    return repository.walks_dates(session, parsed.criteria, parsed.sort)


def test_the_walk_pages_in_sort_order_both_ways(
    client: TestClient, session: Session, visits: dict[str, Any]
) -> None:
    for sort, expected in (("-date", visits["latest_first"]), ("date", visits["earliest_first"])):
        query = f"{WINDOW}&_sort={sort}&_count=2"
        assert _walked(session, query)
        forward, backward = _walk_pages(client, f"/fhir/Encounter?{query}")
        assert forward == expected
        assert backward == expected


def test_one_walk_statement_serves_every_window_of_its_shape(
    client: TestClient, session: Session, visits: dict[str, Any]
) -> None:
    made = visits["made"]
    ties = sorted(made[name] for name in ("tie-1", "tie-2", "tie-3"))
    early_march = "date=ge2031-03-01&date=lt2031-03-11&_sort=-date"
    late_march = "date=ge2031-03-20&date=lt2031-03-29&_sort=-date"
    assert _walked(session, early_march)
    # The same shape (prefixes, sort, page size) with other instants, and back.
    for query, expected in (
        (early_march, [*ties, made["spans-in"], made["early"]]),
        (late_march, [made["ongoing"], made["late"]]),
        (early_march, [*ties, made["spans-in"], made["early"]]),
    ):
        assert _page_ids(get_bundle(client, f"/fhir/Encounter?{query}")) == expected

    # Another date window after the walked one: each keeps its own bounds.
    moved = visit_encounter(
        visits["subject"], f"Organization/{visits['unit_a']}", "2031-03-05T08:00:00Z"
    )
    moved["location"] = [
        {"location": {"display": "Tent"}, "period": {"start": "2031-03-05", "end": "2031-03-06"}}
    ]
    moved_id = create(client, moved)
    for days, expected in ((("05", "06"), [moved_id]), (("07", "08"), [])):
        query = (
            f"{early_march}&location-period=ge2031-03-{days[0]}&location-period=le2031-03-{days[1]}"
        )
        assert _walked(session, query)
        assert _page_ids(get_bundle(client, f"/fhir/Encounter?{query}")) == expected


def test_a_window_whose_bounds_cross_finds_the_periods_spanning_it(
    client: TestClient, session: Session, visits: dict[str, Any]
) -> None:
    # Ends on or after the 25th and starts on or before the 21st: only the ongoing visit.
    crossed = "date=ge2031-03-25&date=le2031-03-21"
    for query in (crossed, f"{crossed}&_sort=-date"):
        bundle = get_bundle(client, f"/fhir/Encounter?{query}")
        assert _page_ids(bundle) == [visits["made"]["ongoing"]]
    assert _walked(session, f"{crossed}&_sort=-date")


def test_the_walk_answers_as_the_planner_does(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unit_a = visits["unit_a"]
    query = f"service-provider=Organization/{unit_a}&{WINDOW}&_sort=-date&_count=2"
    # Few encounters of the unit: the reference drives, as the planner chooses.
    assert not _walked(session, query)
    planned = _walk_pages(client, f"/fhir/Encounter?{query}")
    # Past the threshold the same search walks the dates, with the same pages.
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    assert _walked(session, query)
    walked = _walk_pages(client, f"/fhir/Encounter?{query}")
    of_unit_a = [visits["made"][name] for name in ("ongoing", "tie-1", "tie-3", "early")]
    expected = [i for i in visits["latest_first"] if i in of_unit_a]
    assert walked == planned == (expected, expected)
    included = get_bundle(client, f"/fhir/Encounter?{query}&_include=Encounter:subject")
    assert len([e for e in included["entry"] if e["search"]["mode"] == "include"]) == 1


def test_periods_on_the_window_edges_page_alike_with_and_without_the_walk(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk splits rows at the window's edge: rows on and across it land once, in order."""
    unit = create(client, {"resourceType": "Organization", "name": "Walk edges"})
    subject = f"Patient/{create(client, patient('WALK2'))}"
    periods = [
        # Microseconds: an end exactly on the ceiling (whole seconds cover one).
        ("2031-05-31T22:00:00Z", "2031-06-01T00:00:00.000000Z"),  # ends on the ceiling
        ("2031-06-01T00:00:00Z", "2031-06-01T00:00:00Z"),  # a second from the ceiling
        ("2031-05-01T00:00:00Z", "2031-05-01T01:00:00Z"),  # starts on the floor
        ("2031-04-30T23:00:00Z", "2031-05-01T00:30:00Z"),  # across the floor
        ("2031-05-31T23:30:00Z", "2031-06-01T02:00:00Z"),  # across the ceiling
        ("2031-04-01T00:00:00Z", "2031-07-01T00:00:00Z"),  # across the whole window
        ("2031-05-15T10:00:00Z", "2031-05-15T11:00:00Z"),
        ("2031-05-15T10:00:00Z", "2031-05-15T11:00:00Z"),  # a tie
        ("2031-04-20T08:00:00Z", None),  # ongoing
        ("2031-05-31", "2031-06-01"),  # days, not instants
        # A start after its end (per-1 broken): searched as the span between them.
        ("2031-05-10T00:00:00Z", "2031-04-20T00:00:00Z"),
        ("2031-05-20T00:00:00Z", "2031-05-02T00:00:00Z"),
        ("2031-06-02T08:00:00Z", "2031-06-03T08:00:00Z"),  # after
        ("2031-04-01T08:00:00Z", "2031-04-02T08:00:00Z"),  # before
    ]
    for start, end in periods:
        create(client, visit_encounter(subject, f"Organization/{unit}", start, end))
    windows = [
        "date=ge2031-05-01&date=lt2031-06-01",
        "date=gt2031-05-01&date=le2031-05-31",
        "date=ge2031-05-01",
        "date=lt2031-06-01",
        "date=eq2031-05",
        "date=ge2031-05-15&date=le2031-05-01",
        "date=sa2031-04-30&date=eb2031-06-02",
        "date=ap2031-05-31",
        "date=sa2031-05-01",
        "date=eb2031-05-05",
        "date=ne2031-05",
    ]
    queries = [
        f"service-provider=Organization/{unit}&{window}&_sort={sort}&_count=2"
        for window in windows
        for sort in ("-date", "date")
    ]
    # The unit has few encounters: its reference drives, as the planner chooses.
    planned = {query: _walk_pages(client, f"/fhir/Encounter?{query}") for query in queries}
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    for query in queries:
        assert _walked(session, query)
        forward, backward = _walk_pages(client, f"/fhir/Encounter?{query}")
        assert (forward, backward) == planned[query], query
        assert forward == backward
    assert any(len(found) > 4 for found, _ in planned.values())


def test_the_walk_keeps_to_the_callers_scope(
    client: TestClient, session: Session, visits: dict[str, Any]
) -> None:
    hidden = visits["made"]["late"]

    def condition(resource: FromClause) -> ColumnElement[bool]:
        return not_(and_(resource.c.resource_type == "Encounter", resource.c.id == hidden))

    bundle = search(
        session,
        resource_type="Encounter",
        pairs=[("date", "ge2031-03-01"), ("date", "lt2031-04-01"), ("_sort", "-date")],
        base_url=BASE,
        scope=SearchScope(condition),
    )
    matched = _page_ids(orjson.loads(orjson.dumps(bundle)))
    assert matched == [i for i in visits["latest_first"] if i != hidden]


def test_only_single_valued_dates_are_walked(session: Session) -> None:
    assert single_valued("Encounter", "date")
    assert single_valued("Observation", "date")  # effective[x]: one of its choices
    assert not single_valued("Encounter", "location-period")  # one per location
    assert not single_valued("Patient", "name")
    assert not _walked(session, "location-period=ge2031-03-01&_sort=-location-period")
    # Sorted by another date than the one filtered on: the planner's.
    assert not _walked(session, "date=ge2031-03-01&_sort=-_lastUpdated")


def test_last_updated_order_is_one_an_index_can_serve() -> None:
    """`_lastUpdated` and `_id` are never NULL: no NULLS LAST that would force a sort."""
    for sort, nulls_last in (("-_lastUpdated", False), ("_id", False), ("-date", True)):
        query = parse_search(["Encounter"], [("_sort", sort)], base_url=BASE)
        statement = repository.page_statement(
            criteria=query.criteria,
            sort=query.sort,
            after=None,
            backwards=False,
            limit=21,
            scope=SearchScope(),
        )
        inner = str(statement).split("LIMIT")[0].rsplit("ORDER BY", 1)[1]
        assert inner.split(",")[0].strip().endswith("NULLS LAST") is nulls_last, inner


def test_last_updated_pages_forward_and_back_in_order(client: TestClient) -> None:
    created = [create(client, patient(f"LU{n}", family="Lastupdated")) for n in range(7)]
    forward, backward = _walk_pages(
        client, "/fhir/Patient?family=lastupdated&_sort=-_lastUpdated&_count=3"
    )
    assert forward == list(reversed(created))
    assert backward == forward


def _sort_walks(session: Session, query: str) -> bool:
    pairs = [(name, value) for name, _, value in (p.partition("=") for p in query.split("&"))]
    parsed = parse_search(["Encounter"], pairs, base_url=BASE)
    return repository.walks_sort_dates(session, parsed.criteria, parsed.sort)


@pytest.fixture
def undated(client: TestClient, visits: dict[str, Any]) -> list[str]:
    """Two encounters of the visits' patient without a period: they sort last either way."""
    made = []
    for _ in range(2):
        encounter = visit_encounter(visits["subject"], f"Organization/{visits['unit_a']}", "x")
        del encounter["period"]
        made.append(create(client, encounter))
    return sorted(made)


def test_a_date_sort_without_its_window_walks_the_dates_then_the_undated(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    undated: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    query = f"subject={visits['subject']}"
    planned = {
        (sort, count): _walk_pages(client, f"/fhir/Encounter?{query}&_sort={sort}&_count={count}")
        for sort in ("-date", "date")
        for count in (2, 3)
    }
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    runs: list[bool] = []
    walk = repository._walk_sort_dates

    def counted(*args: Any, **kwargs: Any) -> Any:
        found = walk(*args, **kwargs)
        runs.append(found is not None)
        return found

    monkeypatch.setattr(repository, "_walk_sort_dates", counted)
    for sort in ("-date", "date"):
        for count in (2, 3):
            url = f"/fhir/Encounter?{query}&_sort={sort}&_count={count}"
            assert _sort_walks(session, f"{query}&_sort={sort}")
            forward, backward = _walk_pages(client, url)
            assert (forward, backward) == planned[sort, count], url
            assert forward == backward
            assert forward[-2:] == undated
            dated = [i for i in visits["latest_first"] if i in forward]
            ordered = dated if sort == "-date" else list(visits["earliest_first"])
            assert [i for i in forward if i in ordered] == ordered
    # Every page, the undated ones and the way back included, came from the walk.
    assert runs and all(runs)


def _encounter_date_rows(session: Session) -> int:
    """Count the Encounter date rows the walk reads: every stored encounter's, not just ours."""
    count = session.execute(
        select(func.count())
        .select_from(repository.DATES)
        .where(repository.DATES.c.resource_type == "Encounter", repository.DATES.c.param == "date")
    ).scalar_one()
    return int(count)


def test_a_walk_that_runs_out_of_budget_leaves_the_page_to_the_planner(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    undated: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A page larger than the visits: the walk must read every date row to fill it.
    query = f"subject={visits['subject']}&_sort=-date&_count=50"
    planned = _walk_pages(client, f"/fhir/Encounter?{query}")
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    monkeypatch.setattr(repository, "SORT_WALK_ROWS_PER_MATCH", 0)
    monkeypatch.setattr(repository, "_sort_walks_given_up", {})
    rows = _encounter_date_rows(session)
    # A budget of exactly the date rows there are: walked to the end, then the undated.
    monkeypatch.setattr(repository, "SORT_WALK_MIN_ROWS", rows)
    assert _walk_pages(client, f"/fhir/Encounter?{query}") == planned
    assert not repository._sort_walks_given_up
    # One row short: the planner serves the page, and the search is remembered.
    monkeypatch.setattr(repository, "SORT_WALK_MIN_ROWS", rows - 1)
    assert _walk_pages(client, f"/fhir/Encounter?{query}") == planned
    assert len(repository._sort_walks_given_up) == 1
    parsed = parse_search(["Encounter"], [("_sort", "-date")], base_url=BASE)
    gave_up = repository._walk_sort_dates(
        session,
        criteria=parsed.criteria,
        key=parsed.sort[0],
        after=None,
        backwards=False,
        limit=rows + 1,
        scope=SearchScope(),
    )
    assert gave_up is None


def test_a_resource_that_loses_its_date_during_a_walk_is_listed_once(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    undated: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dated rows and the undated ones are two statements: a write can land between."""
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    subject = visits["subject"]
    early = visits["made"]["early"]
    undated_page = repository._undated_page

    def after_a_write(*args: Any, **kwargs: Any) -> Any:
        # As a concurrent update committing would: `early` loses its period's row.
        session.execute(
            delete(repository.DATES).where(
                repository.DATES.c.resource_type == "Encounter",
                repository.DATES.c.resource_id == early,
                repository.DATES.c.param == "date",
            )
        )
        return undated_page(*args, **kwargs)

    monkeypatch.setattr(repository, "_undated_page", after_a_write)
    bundle = search(
        session,
        resource_type="Encounter",
        pairs=[("subject", subject), ("_sort", "-date"), ("_count", "100")],
        base_url=BASE,
        scope=SearchScope(),
    )
    matched = _page_ids(orjson.loads(orjson.dumps(bundle)))
    assert matched.count(early) == 1
    assert matched[-2:] == undated


def test_a_date_sort_walk_keeps_to_the_callers_scope(
    session: Session, visits: dict[str, Any], undated: list[str]
) -> None:
    hidden = {visits["made"]["late"], undated[0]}

    def condition(resource: FromClause) -> ColumnElement[bool]:
        return not_(and_(resource.c.resource_type == "Encounter", resource.c.id.in_(hidden)))

    subject = visits["subject"]
    bundle = search(
        session,
        resource_type="Encounter",
        pairs=[("subject", subject), ("_sort", "-date"), ("_count", "100")],
        base_url=BASE,
        scope=SearchScope(condition),
    )
    matched = _page_ids(orjson.loads(orjson.dumps(bundle)))
    assert not hidden & set(matched)
    assert matched[-1] == undated[1]


def test_which_date_sorts_walk_without_a_window(
    session: Session, visits: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _sort_walks(session, "_sort=-date")  # no criteria: the walk
    # A patient's few encounters are fetched and sorted: the planner's.
    assert not _sort_walks(session, f"subject={visits['subject']}&_sort=-date")
    # A window on the sort date: the windowed walk's, not this one's.
    assert not _sort_walks(session, f"{WINDOW}&_sort=-date")
    # Criteria the planner cannot size, several sort keys, several values a resource.
    assert not _sort_walks(session, "reason-code:text=fever&_sort=-date")
    assert not _sort_walks(session, "_sort=-date,_id")
    assert not _sort_walks(session, "_sort=-location-period")
    monkeypatch.setattr(repository, "DATE_WALK_MIN_KEYED_MATCHES", 0)
    monkeypatch.setattr(repository, "_walk_decisions", {})
    assert _sort_walks(session, f"subject={visits['subject']}&_sort=-date")


def test_pages_back_from_resources_without_the_sort_value_reach_the_valued_ones(
    client: TestClient,
) -> None:
    """Walking back, the resources without a value come first: then every valued one."""
    born = ["1950-01-01", "1960-01-01", "1970-01-01", "1980-01-01"]
    valued = [
        create(client, patient(f"NS{n}", family="Nullsort", birthDate=d))
        for n, d in enumerate(born)
    ]
    unborn = []
    for n in range(3):
        resource = patient(f"NSX{n}", family="Nullsort")
        del resource["birthDate"]
        unborn.append(create(client, resource))
    for sort, dated in (("-birthdate", valued[::-1]), ("birthdate", valued)):
        for count in (2, 3, 4):
            forward, backward = _walk_pages(
                client, f"/fhir/Patient?family=nullsort&_sort={sort}&_count={count}"
            )
            assert forward == [*dated, *sorted(unborn)], (sort, count)
            assert backward == forward, (sort, count)


def test_a_budgets_last_row_tells_the_walk_ran_out_even_when_it_does_not_match(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row past the budget is a sign, not a match: hidden, it must still stop the walk."""
    subject = visits["subject"]
    unit = f"Organization/{visits['unit_a']}"
    hidden = create(client, visit_encounter(subject, unit, "2099-01-01T08:00:00Z", None))
    shown = create(client, visit_encounter(subject, unit, "2099-01-02T08:00:00Z", None))

    def condition(resource: FromClause) -> ColumnElement[bool]:
        return not_(and_(resource.c.resource_type == "Encounter", resource.c.id == hidden))

    monkeypatch.setattr(repository, "SORT_WALK_ROWS_PER_MATCH", 0)
    rows = _encounter_date_rows(session)
    parsed = parse_search(["Encounter"], [("_sort", "date")], base_url=BASE)

    def walk() -> list[str] | None:
        page = repository._walk_sort_dates(
            session,
            criteria=parsed.criteria,
            key=parsed.sort[0],
            after=None,
            backwards=False,
            limit=rows,
            scope=SearchScope(condition),
        )
        return None if page is None else [row[2] for row in page]

    # Every row read: the hidden one left out, the last one listed last.
    monkeypatch.setattr(repository, "SORT_WALK_MIN_ROWS", rows)
    walked = walk()
    assert walked is not None
    assert hidden not in walked
    assert walked[-1] == shown
    # The budget ends before the hidden row: read to tell, it gives the walk up
    # rather than end the page there and leave out the row after it.
    monkeypatch.setattr(repository, "SORT_WALK_MIN_ROWS", rows - 2)
    assert walk() is None


def test_a_resource_that_gains_its_date_during_a_walk_back_leaves_the_page_full(
    client: TestClient,
    session: Session,
    visits: dict[str, Any],
    undated: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backwards, the undated rows come first: one that gains a date is not counted twice."""
    parsed = parse_search(
        ["Encounter"], [("subject", visits["subject"]), ("_sort", "-date")], base_url=BASE
    )
    gains = undated[0]
    walk_page = repository._sort_walk_page

    def after_a_write(*args: Any, **kwargs: Any) -> Any:
        # As a concurrent update committing would: `gains` now ends before every visit.
        session.execute(
            repository.DATES.insert().values(
                resource_type="Encounter",
                resource_id=gains,
                param="date",
                low=datetime(1990, 1, 1, 8, tzinfo=UTC),
                high=datetime(1990, 1, 1, 9, tzinfo=UTC),
            )
        )
        return walk_page(*args, **kwargs)

    monkeypatch.setattr(repository, "_sort_walk_page", after_a_write)
    page = repository._walk_sort_dates(
        session,
        criteria=parsed.criteria,
        key=parsed.sort[0],
        after=None,
        backwards=True,
        limit=3,
        scope=SearchScope(),
    )
    assert page is not None
    ids = [row[2] for row in page]
    assert len(ids) == 3
    assert sorted(ids[:2]) == undated
    assert ids[2] == visits["made"]["early"]


def test_a_date_sort_walk_reads_no_more_rows_than_its_page_needs(
    session: Session, visits: dict[str, Any]
) -> None:
    """The walk hands out rows as it checks them: a page of 2 reads a few, not its budget."""
    # Dates of encounters that sort after every visit: a walk that sorted its
    # budget before handing out a page would read them all.
    session.execute(
        repository.DATES.insert(),
        [
            {
                "resource_type": "Encounter",
                "resource_id": f"walk-filler-{n}",
                "param": "date",
                "low": datetime(2000, 1, 1, tzinfo=UTC) + timedelta(days=n),
                "high": datetime(2000, 1, 1, tzinfo=UTC) + timedelta(days=n),
            }
            for n in range(100)
        ],
    )
    parsed = parse_search(["Encounter"], [("_sort", "-date")], base_url=BASE)
    statement = repository.first_page_statement(
        criteria=parsed.criteria,
        sort=parsed.sort,
        limit=2,
        scope=SearchScope(),
        walk_dates=False,
        walk_sort_dates=True,
    )
    compiled = statement.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"literal_binds": True}
    )
    plan = session.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}")).scalar_one()

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    scans = [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name") == "fhir_search_date"]
    assert scans
    read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
    # The visits' few dated encounters (two make the page), none of the filler.
    assert read <= len(visits["latest_first"]) + 2
