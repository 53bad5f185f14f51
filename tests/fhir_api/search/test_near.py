"""Location `near` (R4's one `special` parameter): distance, units, edges of the globe, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_api.criteria import matches, parse_criteria
from fhir_api.search.geo import EARTH_RADIUS_KM, NearPoint, great_circle_km
from fhir_api.search_index import extract_index
from tests.fhir_api.search.helpers import FHIR_JSON, create, found, put

TIZNIT = (29.6974, -9.7316)
GUELMIM = (28.987, -10.0574)
AGADIR = (30.4278, -9.5981)


def location(name: str, position: tuple[float, float] | None) -> dict[str, Any]:
    """Return a health post Location at a WGS84 position (or without one)."""
    resource: dict[str, Any] = {"resourceType": "Location", "status": "active", "name": name}
    if position is not None:
        resource["position"] = {"latitude": position[0], "longitude": position[1]}
    return resource


def near(point: tuple[float, float], *rest: str) -> str:
    """Return a Location search by distance from a point."""
    return "/fhir/Location?near=" + "|".join((str(point[0]), str(point[1]), *rest))


def test_great_circle_distances_are_the_haversine_on_the_mean_radius() -> None:
    quarter_meridian = great_circle_km(0.0, 0.0, 90.0, 0.0)
    assert quarter_meridian == pytest.approx(math.pi * EARTH_RADIUS_KM / 2)
    assert great_circle_km(*TIZNIT, *TIZNIT) == 0.0
    # Across the antimeridian and across the pole, the short way round.
    assert great_circle_km(0.0, 179.9, 0.0, -179.9) == pytest.approx(22.24, abs=0.01)
    assert great_circle_km(89.9, 0.0, 89.9, 180.0) == pytest.approx(22.24, abs=0.01)


def test_a_circle_box_splits_at_the_antimeridian_and_opens_at_a_pole() -> None:
    (east_end, east_edge), (west_edge, west_end) = NearPoint(0.0, 179.95, 20.0).longitude_ranges()
    assert (east_edge, west_edge) == (180.0, -180.0)
    assert east_end == pytest.approx(179.77, abs=0.01)
    assert west_end == pytest.approx(-179.87, abs=0.01)
    assert NearPoint(89.95, 10.0, 20.0).longitude_ranges() == [(-180.0, 180.0)]
    south, north = NearPoint(89.95, 10.0, 20.0).latitude_range()
    assert north == 90.0 and south == pytest.approx(89.77, abs=0.01)
    ((west, east),) = NearPoint(60.0, 0.0, 100.0).longitude_ranges()
    # At 60° a degree of longitude is half as long: the box is twice as wide.
    assert east == pytest.approx(-west) and east == pytest.approx(1.80, abs=0.01)


def test_near_finds_locations_within_the_distance(client: TestClient) -> None:
    tiznit = create(client, location("CSR Tiznit", TIZNIT))
    guelmim = create(client, location("CSR Guelmim", GUELMIM))
    agadir = create(client, location("CHR Agadir", AGADIR))
    create(client, location("Poste mobile sans position", None))
    to_guelmim = great_circle_km(*TIZNIT, *GUELMIM)
    to_agadir = great_circle_km(*TIZNIT, *AGADIR)
    assert 75 < to_agadir < to_guelmim - 2 < 90
    assert found(client, near(TIZNIT, "10", "km")) == {tiznit}
    assert found(client, near(TIZNIT, f"{to_agadir + 0.5:.1f}")) == {tiznit, agadir}
    assert found(client, near(TIZNIT, "100", "km")) == {tiznit, guelmim, agadir}
    assert found(client, near(TIZNIT, f"{(to_agadir - 0.5) * 1000:.0f}", "m")) == {tiznit}
    assert found(client, near(TIZNIT, f"{(to_agadir + 0.5) * 1000:.0f}", "m")) == {
        tiznit,
        agadir,
    }
    assert found(client, near(TIZNIT, "55", "[mi_i]")) == {tiznit, guelmim, agadir}
    assert found(client, near(TIZNIT, "45", "[mi_i]")) == {tiznit}
    # Without a distance: the server's own idea of near (10 km), units irrelevant.
    assert found(client, near(TIZNIT)) == {tiznit}
    assert found(client, near(TIZNIT, "", "[mi_i]")) == {tiznit}
    assert found(client, near(TIZNIT, "", "furlong")) == {tiznit}
    assert found(client, near(TIZNIT, "1.5e2", "km")) == {tiznit, guelmim, agadir}
    assert found(client, near(TIZNIT, "100000", "cm")) == {tiznit}
    # A distance of zero: the very point.
    assert found(client, near(TIZNIT, "0")) == {tiznit}
    assert found(client, near((29.6975, -9.7316), "0")) == set()
    # Several values: near any of them.
    either = f"/fhir/Location?near={GUELMIM[0]}|{GUELMIM[1]}|5,{AGADIR[0]}|{AGADIR[1]}|5"
    assert found(client, either) == {guelmim, agadir}


def test_near_across_the_antimeridian_and_the_pole(client: TestClient) -> None:
    fiji_east = create(client, location("Taveuni", (-16.8, 179.95)))
    fiji_west = create(client, location("Rabi", (-16.8, -179.95)))
    north = create(client, location("Station nord", (89.9, 180.0)))
    assert found(client, near((-16.8, 179.99), "10")) == {fiji_east, fiji_west}
    assert found(client, near((-16.8, -179.99), "5")) == {fiji_west}
    assert found(client, near((89.95, 0.0), "20")) == {north}
    assert found(client, near((89.95, 0.0), "15")) == set()


def test_near_missing_chains_and_combines(client: TestClient) -> None:
    placed = create(client, location("CSR Tiznit", TIZNIT))
    unplaced = create(client, location("Poste mobile", None))
    assert unplaced in found(client, "/fhir/Location?near:missing=true")
    assert placed not in found(client, "/fhir/Location?near:missing=true")
    assert placed in found(client, "/fhir/Location?near:missing=false")
    assert unplaced not in found(client, "/fhir/Location?near:missing=false")
    assert found(client, near(TIZNIT, "1") + "&name=csr") == {placed}
    assert found(client, near(TIZNIT, "1") + "&name=chr") == set()
    encounter = create(
        client,
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "FLD"},
            "location": [{"location": {"reference": f"Location/{placed}"}}],
        },
    )
    chained = f"/fhir/Encounter?location.near={TIZNIT[0]}|{TIZNIT[1]}|2"
    assert found(client, chained) == {encounter}
    assert found(client, f"/fhir/Encounter?location.near={AGADIR[0]}|{AGADIR[1]}|2") == set()


def test_a_moved_or_deleted_location_is_found_where_it_is_now(client: TestClient) -> None:
    post = location("Poste mobile 3", TIZNIT)
    post["id"] = "poste-mobile-3"
    put(client, post)
    assert found(client, near(TIZNIT, "1")) == {"poste-mobile-3"}
    post["position"] = {"latitude": AGADIR[0], "longitude": AGADIR[1]}
    put(client, post)
    assert found(client, near(TIZNIT, "1")) == set()
    assert found(client, near(AGADIR, "1")) == {"poste-mobile-3"}
    assert client.delete("/fhir/Location/poste-mobile-3").status_code in (200, 204)
    assert found(client, near(AGADIR, "1")) == set()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("29.6", "latitude|longitude"),
        ("29.6|-9.7|1|km|extra", "latitude|longitude"),
        ("north|-9.7", "latitude is not"),
        ("91|-9.7", "latitude is outside"),
        ("29.6|-181", "longitude is outside"),
        ("29.6|NaN", "longitude is not"),
        ("sNaN|-9.7", "latitude is not"),
        ("29.6| -9.7", "longitude is not"),
        ("٢٩|-9.7", "latitude is not"),
        ("29.6||10", "longitude is not"),
        ("29.6|-9.7|-1", "zero or more"),
        ("29.6|-9.7|le10", "distance is not"),
        ("29.6|-9.7|Infinity", "distance is not"),
        ("29.6|-9.7|10|furlong", "UCUM"),
    ],
)
def test_a_malformed_near_is_a_400_that_names_the_part(
    client: TestClient, value: str, says: str
) -> None:
    response = client.get(f"/fhir/Location?near={value}")
    assert response.status_code == 400, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert says in outcome["issue"][0]["diagnostics"]


def test_near_takes_no_modifier_and_no_sort(client: TestClient) -> None:
    assert client.get(f"/fhir/Location?near:exact={TIZNIT[0]}|{TIZNIT[1]}").status_code == 400
    assert client.get("/fhir/Location?_sort=near").status_code == 400
    # Other types have no `near`: ignored and reported, as any unknown parameter.
    bundle = client.get(f"/fhir/Patient?near={TIZNIT[0]}|{TIZNIT[1]}").json()
    outcomes = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]
    assert outcomes and "near" in str(outcomes[0]["resource"])


def test_near_is_evaluated_on_a_bundles_own_new_resources() -> None:
    criteria = parse_criteria("Location", f"near={TIZNIT[0]}|{TIZNIT[1]}|5", base_url="")
    assert matches(criteria, "new", extract_index(location("CSR", (29.70, -9.73))))
    assert not matches(criteria, "new", extract_index(location("CHR", AGADIR)))
    assert not matches(criteria, "new", extract_index(location("Sans position", None)))


def test_a_conditional_create_by_position_finds_the_stored_location(client: TestClient) -> None:
    tiznit = create(client, location("CSR Tiznit", TIZNIT))
    response = client.post(
        "/fhir/Location",
        json=location("CSR Tiznit (doublon)", (29.6975, -9.7317)),
        headers={**FHIR_JSON, "If-None-Exist": f"near={TIZNIT[0]}|{TIZNIT[1]}|0.1"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["id"] == tiznit


def test_the_capability_statement_documents_near(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    (resource,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Location"]
    (entry,) = [p for p in resource["searchParam"] if p["name"] == "near"]
    assert entry["type"] == "special"
    assert "km" in entry["documentation"] and "[mi_i]" in entry["documentation"]


def test_near_pages_without_gaps_or_repeats(client: TestClient) -> None:
    created = {create(client, location(f"Poste {n}", (29.6 + n / 100, -9.7))) for n in range(5)}
    for sort in ("", "&_sort=name", "&_sort=-_lastUpdated"):
        url = near((29.6, -9.7), "10") + "&_count=2" + sort
        seen: list[str] = []
        while url:
            bundle = client.get(url).json()
            seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")
        assert sorted(seen) == sorted(created), sort


def test_positions_off_the_globe_are_not_indexed_and_longitudes_past_180_wrap(
    client: TestClient,
) -> None:
    # R4 does not bound the decimals, so such positions are stored as sent.
    wrapped = create(client, location("Past the antimeridian", (10.0, 190.0)))
    create(client, location("Past the pole", (95.0, 10.0)))
    assert found(client, near((10.0, -170.0), "1")) == {wrapped}
    assert found(client, near((90.0, 10.0), "600")) == set()
    criteria = parse_criteria("Location", "near=10|-170|1", base_url="")
    assert matches(criteria, "new", extract_index(location("Wrapped", (10.0, 190.0))))
    assert not extract_index(location("Off", (95.0, 10.0))).quantities
