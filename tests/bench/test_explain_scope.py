"""bench.search explains a page as the API runs it for the caller the run acts as."""

from __future__ import annotations

import argparse

from auth.policy import SCOPE_GRANTEES
from bench.search import caller_scope
from fhir_api.search import repository
from fhir_api.search.parser import parse_search
from tests.servers import TokenSource


def _args(token: str) -> argparse.Namespace:
    return argparse.Namespace(token=token, as_="ignored", issuer_url="http://unused")


def test_a_units_plans_carry_its_care_relationships(tokens: TokenSource) -> None:
    scope = caller_scope(_args(tokens.token("unit-01")))
    assert scope.condition is not None
    assert scope.parameters[SCOPE_GRANTEES] == ["unit:unit-01"]
    parsed = parse_search(
        ["Encounter"], [("service-provider", "Organization/unit-02")], base_url="http://x/fhir"
    )
    statement = repository.first_page_statement(
        criteria=parsed.criteria,
        sort=parsed.sort,
        limit=21,
        scope=scope,
        walk_dates=False,
        walk_sort_dates=False,
    )
    assert "care_relationship" in str(statement)


def test_an_administrators_plans_have_no_row_condition(tokens: TokenSource) -> None:
    assert caller_scope(_args(tokens.token("admin"))).condition is None
