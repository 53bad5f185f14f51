"""What an `Access` tells the record store without a database: its SQL conditions' shape."""

from __future__ import annotations

import pytest
from sqlalchemy import Integer, literal_column

from auth.policy import access_for
from auth.tokens import Principal
from fhir_api.repository import RESOURCE


def _principal(role: str, scopes: frozenset[str] = frozenset(), **claims: str) -> Principal:
    return Principal(
        subject=f"{role}-1",
        client_id=claims.get("unit", "waha-web"),
        username=None,
        roles=frozenset({role}),
        unit=claims.get("unit"),
        region=claims.get("region"),
        community=None,
        specialty=claims.get("specialty"),
        scopes=scopes,
        token_id=None,
        expires_at=4_000_000_000,
    )


PRINCIPALS = {
    "admin": _principal("admin"),
    "admin, Observations only": _principal("admin", frozenset({"user/Observation.rs"})),
    "admin, openid only": _principal("admin", frozenset({"openid"})),
    "unit": _principal("unit", unit="unit-01"),
    "coordinator without a region": _principal("coordinator"),
    "specialist, Observations only": _principal(
        "specialist", frozenset({"user/Observation.rs"}), specialty="dermatology"
    ),
}


@pytest.mark.parametrize("name", PRINCIPALS)
def test_restricts_rows_says_whether_there_is_a_row_condition(name: str) -> None:
    access = access_for(PRINCIPALS[name])
    assert access.restricts_rows == (access.row_condition(RESOURCE) is not None)


@pytest.mark.parametrize("name", PRINCIPALS)
def test_only_an_administrator_sees_every_patient(name: str) -> None:
    access = access_for(PRINCIPALS[name])
    patients = access.patient_condition(RESOURCE.c.compartment_key, literal_column("1", Integer))
    assert (patients is None) == access.unrestricted
