"""Result parameters, includes, chaining, _has, system and POST search, batch entries."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from tests.builders import NATIONAL_ID, observation, patient
from tests.fhir_api.search.helpers import FHIR_JSON, create, found, ids, search, visit_encounter


def _organization(client: TestClient, name: str) -> str:
    return create(client, {"resourceType": "Organization", "name": name})


def test_id_and_last_updated(client: TestClient) -> None:
    first = create(client, patient("ID1"))
    second = create(client, patient("ID2"))
    assert found(client, f"/fhir/Patient?_id={first},{second}") == {first, second}
    assert first not in found(client, f"/fhir/Patient?_id:not={first}")
    stamp = client.get(f"/fhir/Patient/{second}").json()["meta"]["lastUpdated"]
    assert second in found(client, f"/fhir/Patient?_lastUpdated=ge{stamp[:10]}")
    assert found(client, "/fhir/Patient?_lastUpdated=lt2000-01-01") == set()
    assert second in found(client, f"/fhir/Patient?_lastUpdated={stamp}")


def test_count_default_and_maximum(client: TestClient) -> None:
    for number in range(23):
        create(client, patient(f"CT{number}"))
    default = search(client, "/fhir/Patient")
    assert len(default["entry"]) == 20
    assert "total" not in default  # more than one page: no free total
    assert any(link["relation"] == "next" for link in default["link"])
    capped = search(client, "/fhir/Patient?_count=5000")
    assert len(capped["entry"]) == 23
    assert capped["total"] == 23
    # The links say the search as performed.
    assert all("_count=1000" in link["url"] for link in capped["link"])
    only_total = search(client, "/fhir/Patient?_count=0")
    assert only_total["total"] == 23
    assert only_total["entry"] == []


def test_total_modes_and_summary_count(client: TestClient) -> None:
    for number in range(3):
        create(client, patient(f"TT{number}"))
    assert search(client, "/fhir/Patient?_count=1&_total=accurate")["total"] == 3
    # The planner's estimate: a number, not necessarily exact.
    assert isinstance(
        search(client, "/fhir/Patient?gender=female&name=a&_count=1&_total=estimate")["total"], int
    )
    assert "total" not in search(client, "/fhir/Patient?_total=none")
    counted = search(client, "/fhir/Patient?_summary=count")
    assert counted["total"] == 3
    assert counted["entry"] == []


def _family_order(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["name"][0]["family"] for e in bundle["entry"]]


def test_sort_several_keys_and_directions(client: TestClient) -> None:
    create(client, patient("SO1", family="Chraibi", birthDate="1970-01-01"))
    create(client, patient("SO2", family="Alaoui", birthDate="1980-01-01", gender="male"))
    create(client, patient("SO3", family="Benali", birthDate="1990-01-01"))
    assert _family_order(search(client, "/fhir/Patient?_sort=family")) == [
        "Alaoui",
        "Benali",
        "Chraibi",
    ]
    assert _family_order(search(client, "/fhir/Patient?_sort=-birthdate")) == [
        "Benali",
        "Alaoui",
        "Chraibi",
    ]
    assert _family_order(search(client, "/fhir/Patient?_sort=gender,-birthdate")) == [
        "Benali",
        "Chraibi",
        "Alaoui",
    ]
    by_id = search(client, "/fhir/Patient?_sort=-_id")
    assert [e["resource"]["id"] for e in by_id["entry"]] == sorted(ids(by_id), reverse=True)


def _walk(client: TestClient, url: str) -> list[str]:
    seen: list[str] = []
    while url:
        bundle = search(client, url)
        seen.extend(e["resource"]["id"] for e in bundle["entry"])
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")
    return seen


@pytest.mark.parametrize(
    "sort", ["", "&_sort=family", "&_sort=-birthdate,family", "&_sort=-_lastUpdated"]
)
def test_pages_cover_every_match_once_and_go_back(client: TestClient, sort: str) -> None:
    created = {
        create(client, patient(f"PG{n}", family=f"Fam{n % 3}", birthDate=f"19{50 + n % 4}-01-01"))
        for n in range(11)
    }
    pages = _walk(client, f"/fhir/Patient?_count=3{sort}")
    assert len(pages) == 11
    assert set(pages) == created
    second = search(client, f"/fhir/Patient?_count=3{sort}")
    next_url = next(link["url"] for link in second["link"] if link["relation"] == "next")
    page_two = search(client, next_url)
    previous = next(link["url"] for link in page_two["link"] if link["relation"] == "previous")
    back = search(client, previous)
    assert [e["resource"]["id"] for e in back["entry"]] == pages[:3]
    assert not any(link["relation"] == "previous" for link in second["link"])


def test_include_revinclude_and_iterate(client: TestClient) -> None:
    provider = _organization(client, "Unit 01")
    subject = create(
        client, patient("IN1", managingOrganization={"reference": f"Organization/{provider}"})
    )
    encounter = create(
        client, visit_encounter(f"Patient/{subject}", f"Organization/{provider}", "2026-11-02")
    )
    reading = observation(f"Patient/{subject}")
    reading["encounter"] = {"reference": f"Encounter/{encounter}"}
    observed = create(client, reading)
    bundle = search(client, f"/fhir/Observation?_id={observed}&_include=Observation:subject")
    assert ids(bundle) == {observed}
    assert ids(bundle, "include") == {subject}
    typed = search(client, f"/fhir/Observation?_id={observed}&_include=Observation:subject:Group")
    assert ids(typed, "include") == set()
    everything = search(client, f"/fhir/Observation?_id={observed}&_include=*")
    assert ids(everything, "include") == {subject, encounter}
    iterated = search(
        client,
        f"/fhir/Observation?_id={observed}&_include=Observation:encounter"
        "&_include:iterate=Encounter:service-provider",
    )
    assert ids(iterated, "include") == {encounter, provider}
    reverse = search(client, f"/fhir/Patient?_id={subject}&_revinclude=Observation:subject")
    assert ids(reverse, "include") == {observed}
    both = search(
        client,
        f"/fhir/Patient?_id={subject}&_revinclude=Encounter:subject&_include=Patient:organization",
    )
    assert ids(both, "include") == {encounter, provider}


def test_revinclude_star_brings_every_referencing_type(client: TestClient) -> None:
    provider = _organization(client, "Unit 02")
    subject = create(client, patient("RS1"))
    bystander = create(client, patient("RS2"))
    encounter = create(
        client, visit_encounter(f"Patient/{subject}", f"Organization/{provider}", "2026-11-03")
    )
    observed = create(client, observation(f"Patient/{subject}"))
    create(client, observation(f"Patient/{bystander}"))
    everything = search(client, f"/fhir/Patient?_id={subject}&_revinclude=*")
    assert ids(everything) == {subject}
    assert ids(everything, "include") == {encounter, observed}
    # From the Organization's side, only what points at it: the Encounter's serviceProvider.
    unit_side = search(client, f"/fhir/Organization?_id={provider}&_revinclude=*")
    assert ids(unit_side, "include") == {encounter}
    typed = search(client, f"/fhir/Patient?_id={subject}&_revinclude=Encounter:*")
    assert ids(typed, "include") == {encounter}


def _page_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == relation), None)


def test_name_prefix_pages_list_each_resource_once_by_its_first_matching_name(
    client: TestClient,
) -> None:
    # Each of these has three name parts starting "na": one entry each, never
    # three, placed at its first matching part ("nadia"), then by id.
    named: list[dict[str, Any]] = [{"family": "Naim", "given": ["Nadia", "Nawal"]}]
    created = [create(client, patient(f"NP{number}", name=named)) for number in range(7)]
    earlier = sorted(create(client, patient(f"NB{n}", family="Nabil")) for n in range(2))
    later = create(client, patient("NZ", name=[{"family": "Nouri", "given": ["Nazih"]}]))
    create(client, patient("NP-other", family="Bennani"))
    gone = created.pop(3)
    assert client.delete(f"/fhir/Patient/{gone}").status_code in (200, 204)
    pages: list[list[str]] = []
    bundle = search(client, "/fhir/Patient?name=na&_count=2")
    while True:
        pages.append(_page_ids(bundle))
        following = _link(bundle, "next")
        if following is None:
            break
        bundle = search(client, following)
    walked = [resource_id for page in pages for resource_id in page]
    assert walked == [*earlier, *sorted(created), later]
    assert [len(page) for page in pages] == [2, 2, 2, 2, 1]
    backwards: list[str] = []
    while (preceding := _link(bundle, "previous")) is not None:
        bundle = search(client, preceding)
        backwards = _page_ids(bundle) + backwards
    assert backwards == walked[:8]
    # A page cursor carries the name it stopped at: one from another search is refused.
    cursor = _link(search(client, "/fhir/Patient?name=na&_count=2"), "next")
    assert cursor is not None
    sorted_search = cursor.replace("name=na", "name=na&_sort=birthdate")
    assert client.get(sorted_search).status_code == 400
    # The same shape of search, other prefixes: the page statement is reused
    # with this search's values, not the first one's.
    assert _page_ids(search(client, "/fhir/Patient?name=nab&_count=2")) == earlier
    assert _page_ids(search(client, "/fhir/Patient?name=nou&_count=2")) == [later]
    both = search(client, "/fhir/Patient?name=nawal,bennani&_count=100")
    assert len(_page_ids(both)) == 7
    narrowed = search(client, "/fhir/Patient?name=na&gender=male")
    assert _page_ids(narrowed) == []


def test_chaining_one_level(client: TestClient) -> None:
    subject = create(client, patient("CH1", family="Chraibi"))
    other = create(client, patient("CH2", family="Alaoui"))
    mine = create(client, observation(f"Patient/{subject}"))
    create(client, observation(f"Patient/{other}"))
    assert found(client, f"/fhir/Observation?subject:Patient.identifier={NATIONAL_ID}|CH1") == {
        mine
    }
    assert found(client, "/fhir/Observation?subject.name=chraibi") == {mine}
    assert found(client, "/fhir/Observation?patient.birthdate=1961-04-02") >= {mine}
    assert found(client, "/fhir/Observation?subject:Patient.name=nobody") == set()
    response = client.get("/fhir/Observation?subject.organization.name=x")
    assert response.status_code == 400


def test_reverse_chaining_has(client: TestClient) -> None:
    observed = create(client, patient("HA1"))
    quiet = create(client, patient("HA2"))
    create(client, observation(f"Patient/{observed}", code="8480-6"))
    create(client, observation(f"Patient/{quiet}", code="8867-4"))
    assert found(client, "/fhir/Patient?_has:Observation:subject:code=8480-6") == {observed}
    assert found(client, "/fhir/Patient?_has:Observation:patient:code=8867-4") == {quiet}
    bad = client.get("/fhir/Patient?_has:Observation:code:code=1")
    assert bad.status_code == 400


def test_summary_and_elements_subset(client: TestClient) -> None:
    subject = create(
        client,
        patient(
            "SU1",
            text={
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>',
            },
        ),
    )
    summary = search(client, f"/fhir/Patient?_id={subject}&_summary=true")["entry"][0]["resource"]
    assert "name" in summary and "text" not in summary
    assert {"code": "SUBSETTED"}.items() <= summary["meta"]["tag"][0].items()
    data = search(client, f"/fhir/Patient?_id={subject}&_summary=data")["entry"][0]["resource"]
    assert "text" not in data and "gender" in data
    text = search(client, f"/fhir/Patient?_id={subject}&_summary=text")["entry"][0]["resource"]
    assert set(text) == {"resourceType", "id", "meta", "text"}
    elements = search(client, f"/fhir/Patient?_id={subject}&_elements=gender,birthDate")
    resource = elements["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "gender", "birthDate"}


def test_post_search_merges_url_and_form(client: TestClient) -> None:
    subject = create(client, patient("PO1", family="Benali"))
    create(client, patient("PO2", family="Benali", gender="male"))
    response = client.post(
        "/fhir/Patient/_search?gender=female",
        content="family=benali&_count=5",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert ids(response.json()) == {subject}
    refused = client.post("/fhir/Patient/_search", json={"family": "x"}, headers=FHIR_JSON)
    assert refused.status_code == 415
    garbled = client.post(
        "/fhir/Patient/_search",
        content=b"family=\xff",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert garbled.status_code == 400


def test_system_search_over_several_types(client: TestClient) -> None:
    subject = create(client, patient("SY1"))
    observed = create(client, observation(f"Patient/{subject}"))
    bundle = search(client, f"/fhir?_type=Patient,Observation&_id={subject},{observed}")
    assert ids(bundle) == {subject, observed}
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert urlsplit(self_link).path == "/fhir"
    assert client.get("/fhir?_id=x").status_code == 400
    by_patient = search(client, f"/fhir?_type=Observation,Encounter&patient={subject}")
    assert ids(by_patient) == {observed}
    # `code` is not a Patient parameter: ignored for every type, and reported.
    partial = search(client, f"/fhir?_type=Observation,Patient&_id={observed}&code=nope")
    assert ids(partial) == {observed}
    assert partial["entry"][-1]["search"]["mode"] == "outcome"


def test_search_inside_a_batch(client: TestClient) -> None:
    subject = create(client, patient("BA1"))
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient?identifier={NATIONAL_ID}|BA1"}},
            {"request": {"method": "GET", "url": "Patient?birthdate=bad-date"}},
        ],
    }
    response = client.post("/fhir", json=batch, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("200")
    assert ids(first["resource"]) == {subject}
    assert second["response"]["status"].startswith("400")


def test_unknown_parameter_lenient_and_strict(client: TestClient) -> None:
    subject = create(client, patient("UN1"))
    lenient = search(client, f"/fhir/Patient?_id={subject}&shoe-size=42")
    assert ids(lenient) == {subject}
    outcome = [e for e in lenient["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome[0]["resource"]["resourceType"] == "OperationOutcome"
    assert "shoe-size" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    strict = client.get("/fhir/Patient?shoe-size=42", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert strict.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "query",
    [
        "Patient?birthdate=xx1961",
        "Patient?birthdate=1961-13",
        "Patient?birthdate=zz1961-01",
        "Patient?_count=-1",
        "Patient?_count=ten",
        "Observation?value-quantity=gtabc",
        "Observation?code-value-quantity=8480-6",
        "Observation?subject:Spaceship=1",
        "Patient?name:below=x",
        "Patient?gender:exact=x",
        "Patient?_sort=shoe-size",
        "Patient?_total=maybe",
        "Patient?_summary=some",
        "Patient?_include=Observation",
        "Patient?identifier:of-type=onlyone",
        "Patient?_cursor=not-a-cursor",
        "Patient?birthdate=",
    ],
)
def test_malformed_searches_are_400(client: TestClient, query: str) -> None:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 400, query
    assert response.json()["resourceType"] == "OperationOutcome"


def test_unknown_type_is_404(client: TestClient) -> None:
    assert client.get("/fhir/Spaceship?name=x").status_code == 404


def test_links_repeat_the_query(client: TestClient) -> None:
    for number in range(3):
        create(client, patient(f"LK{number}"))
    bundle = search(client, "/fhir/Patient?gender=female&_count=2")
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert set(links) == {"self", "first", "next"}
    query = parse_qs(urlsplit(links["next"]).query)
    assert query["gender"] == ["female"] and query["_count"] == ["2"] and "_cursor" in query


def test_capability_statement_lists_search_parameters(client: TestClient) -> None:
    body = client.get("/fhir/metadata").json()
    rest = body["rest"][0]
    patient_entry = next(r for r in rest["resource"] if r["type"] == "Patient")
    names = {p["name"] for p in patient_entry["searchParam"]}
    assert {"identifier", "name", "birthdate", "_id", "_lastUpdated"} <= names
    assert {"code": "search-type"} in patient_entry["interaction"]
    assert (
        "Observation:subject"
        in next(r for r in rest["resource"] if r["type"] == "Observation")["searchInclude"]
    )
    assert {"code": "search-system"} in rest["interaction"]


def test_revinclude_iterate_and_absolute_references(client: TestClient) -> None:
    provider = _organization(client, "Unit 02")
    subject = create(client, patient("RI1"))
    encounter = create(
        client, visit_encounter(f"Patient/{subject}", f"Organization/{provider}", "2026-11-03")
    )
    reading = observation(f"http://127.0.0.1:8000/fhir/Patient/{subject}")
    reading["encounter"] = {"reference": f"Encounter/{encounter}"}
    observed = create(client, reading)
    bundle = search(
        client,
        f"/fhir/Patient?_id={subject}&_revinclude=Encounter:subject"
        "&_revinclude:iterate=Observation:encounter",
    )
    assert ids(bundle) == {subject}
    assert ids(bundle, "include") == {encounter, observed}
    absolute = search(client, f"/fhir/Observation?_id={observed}&_include=Observation:patient")
    assert ids(absolute, "include") == {subject}
    # The absolute reference is found by every reference form, chains and _has included.
    assert found(client, f"/fhir/Observation?subject=Patient/{subject}") == {observed}
    assert found(client, f"/fhir/Observation?patient={subject}") == {observed}
    assert found(client, f"/fhir/Observation?subject:Patient._id={subject}") == {observed}
    assert found(client, f"/fhir/Patient?_has:Observation:patient:_id={observed}") == {subject}
    back = search(client, f"/fhir/Patient?_id={subject}&_revinclude=Observation:subject")
    assert ids(back, "include") == {observed}


def test_searches_of_one_shape_each_get_their_own_values(client: TestClient) -> None:
    # One page query serves every search of a shape: a search must not see another's values.
    first = create(client, patient("SHAPE-1"))
    second = create(client, patient("SHAPE-2"))
    by_identifier = f"/fhir/Patient?identifier={NATIONAL_ID}|"
    assert found(client, by_identifier + "SHAPE-1") == {first}
    assert found(client, by_identifier + "SHAPE-2") == {second}
    assert found(client, by_identifier + "SHAPE-3") == set()
    assert found(client, by_identifier + "SHAPE-1,SHAPE-2") == {first, second}
    assert found(client, f"/fhir/Patient?_id={first}") == {first}
    assert found(client, f"/fhir/Patient?_id={second}") == {second}
    both = f"/fhir/Patient?identifier={NATIONAL_ID}|SHAPE-1,SHAPE-2"
    assert found(client, f"{both}&_id:not={first}") == {second}
    assert found(client, f"{both}&_id:not={second}") == {first}
    assert len(ids(search(client, f"{both}&_count=1"))) == 1
