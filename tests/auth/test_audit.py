"""The audit trail: events survive rolled-back requests, read as BALP, admins alone search them."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi import FastAPI
from fastapi.testclient import TestClient
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import Engine, MetaData, create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from auth.audit import service
from auth.audit.errors import AuditUnavailable
from auth.audit.models import AuditEventRow
from auth.audit.router import router as audit_router
from auth.errors import InvalidToken
from auth.tokens import Principal, TokenValidator
from hub import db, outbox
from hub.db import Base
from hub.errors import install_error_handlers
from hub.settings import Settings

ADMIN = Principal(
    subject="0b6f3f5e-admin",
    client_id="waha-web",
    username="admin",
    roles=frozenset({"admin"}),
    unit=None,
    region=None,
    community=None,
    specialty=None,
    scopes=frozenset({"openid"}),
    token_id="t-1",
    expires_at=4_000_000_000,
)
UNIT = Principal(
    subject="service-account-unit-01",
    client_id="unit-01",
    username="service-account-unit-01",
    roles=frozenset({"unit"}),
    unit="unit-01",
    region="marrakech-safi",
    community=None,
    specialty=None,
    scopes=frozenset(),
    token_id="t-2",
    expires_at=4_000_000_000,
)
MOMENT = datetime(2031, 5, 17, 10, 30, tzinfo=UTC)


def audit_record(**changes: Any) -> service.AuditRecord:
    """An audit record of a unit reading a patient's observation, with `changes` applied."""
    values: dict[str, Any] = {
        "action": "R",
        "subtype": "read",
        "outcome": "0",
        "outcome_description": None,
        "principal": UNIT,
        "client_id": None,
        "source_address": "10.20.30.40",
        "request_id": uuid.uuid4().hex,
        "method": "GET",
        "path": "/fhir/Observation/9",
        "patient_ids": (),
        "entity_refs": (),
        "recorded": MOMENT,
    }
    values.update(changes)
    return service.AuditRecord(**values)


def stored(session: Session, **where: str) -> list[dict[str, Any]]:
    """Return the stored AuditEvent resources whose columns equal `where`, oldest first."""
    condition = " AND ".join(f"{column} = :{column}" for column in where) or "true"
    rows = session.execute(
        text(f"SELECT resource FROM audit_event WHERE {condition} ORDER BY recorded, id"),  # noqa: S608 - test column names
        where,
    )
    return [row[0] for row in rows]


# --- recording ----------------------------------------------------------------------------


def test_events_survive_the_rollback_of_the_request_session(
    db_engine: Engine, settings: Settings
) -> None:
    request_id = uuid.uuid4().hex
    try:
        with Session(db_engine) as request_session:
            request_session.begin()
            outbox.add_events(request_session, "auth.audit_test", [{}], request_id=request_id)
            service.record(db_engine, [audit_record(request_id=request_id, outcome="4")])
            request_session.rollback()
        with db_engine.connect() as connection:
            audited = connection.execute(
                text("SELECT outcome FROM audit_event WHERE request_id = :id"), {"id": request_id}
            ).scalars()
            assert list(audited) == ["4"]
            request_rows = connection.execute(
                text("SELECT count(*) FROM outbox_event WHERE request_id = :id"),
                {"id": request_id},
            ).scalar_one()
            assert request_rows == 0
    finally:
        # The application role may not delete from the trail; the owner cleans up.
        owner = create_engine(str(settings.migration_database_url))
        with owner.begin() as connection:
            connection.execute(
                text("DELETE FROM audit_event WHERE request_id = :id"), {"id": request_id}
            )
        owner.dispose()


def test_many_events_are_written_in_one_call(session: Session) -> None:
    request_id = uuid.uuid4().hex
    records = [
        audit_record(request_id=request_id, entity_refs=(f"Observation/{n}",)) for n in range(5)
    ]
    service.record(db.session_factory, records)
    assert len(stored(session, request_id=request_id)) == 5


def test_nothing_to_record_writes_nothing(session: Session) -> None:
    before = session.execute(text("SELECT count(*) FROM audit_event")).scalar_one()
    service.record(db.session_factory, [])
    assert session.execute(text("SELECT count(*) FROM audit_event")).scalar_one() == before


def test_an_unwritable_trail_raises(settings: Settings) -> None:
    url = str(settings.database_url).rsplit("/", 1)[0] + "/waha_no_such_database"
    unreachable = create_engine(url)
    try:
        with pytest.raises(AuditUnavailable) as error:
            service.record(unreachable, [audit_record()])
        assert error.value.status == 503
    finally:
        unreachable.dispose()


def test_a_bad_action_or_outcome_stores_nothing(session: Session) -> None:
    request_id = uuid.uuid4().hex
    good = audit_record(request_id=request_id)
    with pytest.raises(ValueError, match="action/outcome"):
        service.record(db.session_factory, [good, audit_record(request_id=request_id, action="X")])
    with pytest.raises(ValueError, match="action/outcome"):
        service.record(db.session_factory, [audit_record(request_id=request_id, outcome="3")])
    assert stored(session, request_id=request_id) == []


@pytest.mark.parametrize(
    ("subtype", "action"),
    [
        ("create", "C"),
        ("read", "R"),
        ("vread", "R"),
        ("search-type", "R"),
        ("history-system", "R"),
        ("update", "U"),
        ("patch", "U"),
        ("delete", "D"),
        ("transaction", "E"),
        ("operation", "E"),
        ("login", "E"),
    ],
)
def test_action_follows_the_interaction(subtype: str, action: str) -> None:
    assert service.action_for(subtype) == action


@pytest.mark.parametrize(
    ("status", "outcome"), [(200, "0"), (201, "0"), (304, "0"), (403, "4"), (404, "4"), (503, "8")]
)
def test_outcome_follows_the_status(status: int, outcome: str) -> None:
    assert service.outcome_for_status(status) == outcome


# --- the BALP resource --------------------------------------------------------------------


def test_a_unit_read_is_a_valid_balp_audit_event(session: Session) -> None:
    request_id = uuid.uuid4().hex
    service.record(
        db.session_factory,
        [
            audit_record(
                request_id=request_id,
                patient_ids=("p-1", "p-1"),
                entity_refs=("Observation/9", "Patient/p-1"),
            )
        ],
    )
    [resource] = stored(session, request_id=request_id)
    AuditEvent.model_validate(resource)
    assert resource["type"]["code"] == "rest"
    assert resource["subtype"] == [
        {"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}
    ]
    assert resource["action"] == "R"
    assert resource["outcome"] == "0"
    assert resource["recorded"] == "2031-05-17T10:30:00Z"
    requestor, client, server = resource["agent"]
    assert requestor["requestor"] is True
    assert requestor["who"] == {"reference": "Device/unit-01", "display": "unit-01"}
    assert requestor["network"] == {"address": "10.20.30.40", "type": "2"}
    assert client["who"]["identifier"]["value"] == "unit-01"
    assert client["requestor"] is False
    assert server["type"]["coding"][0]["code"] == "110152"
    assert resource["source"]["observer"] == {"display": "Waha"}
    patient, observation, transaction = resource["entity"]
    assert patient["what"] == {"reference": "Patient/p-1"}
    assert (patient["type"]["code"], patient["role"]["code"]) == ("1", "1")
    assert observation["what"] == {"reference": "Observation/9"}
    assert transaction["what"]["identifier"]["value"] == request_id
    columns = session.execute(
        text(
            "SELECT agent_who, agent_client, agent_roles, patient_ids, entity_refs, source_address"
            " FROM audit_event WHERE request_id = :id"
        ),
        {"id": request_id},
    ).one()
    assert tuple(columns) == (
        "Device/unit-01",
        "unit-01",
        ["unit"],
        ["p-1"],
        ["Patient/p-1", "Observation/9"],
        "10.20.30.40",
    )


def test_a_user_search_carries_its_query_and_a_denial_its_reason(session: Session) -> None:
    request_id = uuid.uuid4().hex
    service.record(
        db.session_factory,
        [
            audit_record(
                request_id=request_id,
                principal=ADMIN,
                subtype="search-type",
                path="/fhir/Observation",
                query="subject=Patient/p-2&code=8867-4",
                outcome="4",
                outcome_description="forbidden",
            )
        ],
    )
    [resource] = stored(session, request_id=request_id)
    AuditEvent.model_validate(resource)
    requestor = resource["agent"][0]
    assert requestor["who"]["identifier"]["value"] == ADMIN.subject
    assert requestor["who"]["display"] == "admin"
    assert resource["agent"][1]["who"]["identifier"]["value"] == "waha-web"
    assert resource["outcomeDesc"] == "forbidden"
    [query, _transaction] = resource["entity"]
    assert query["role"]["code"] == "24"
    assert base64.b64decode(query["query"]).decode() == (
        "/fhir/Observation?subject=Patient/p-2&code=8867-4"
    )


def test_a_failed_login_is_audited_without_a_principal(session: Session) -> None:
    request_id = uuid.uuid4().hex
    service.record(
        db.session_factory,
        [
            audit_record(
                request_id=request_id,
                principal=None,
                action="E",
                subtype="login",
                outcome="4",
                outcome_description="the token has expired",
                source_address=None,
            )
        ],
    )
    [resource] = stored(session, request_id=request_id)
    AuditEvent.model_validate(resource)
    assert resource["type"]["code"] == "110114"
    assert resource["subtype"][0]["code"] == "110122"
    assert resource["agent"] == [
        {
            "type": resource["agent"][0]["type"],
            "requestor": True,
            "who": {"display": "anonymous"},
        },
        {"type": resource["agent"][1]["type"], "who": {"display": "Waha"}, "requestor": False},
    ]


# --- the application role may only add and read ----------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_event SET outcome = '0'",
        "DELETE FROM audit_event",
        "TRUNCATE audit_event",
    ],
)
def test_the_application_role_cannot_rewrite_the_trail(db_engine: Engine, statement: str) -> None:
    with db_engine.connect() as connection:
        assert connection.execute(text("SELECT current_user")).scalar_one() == "waha_app"
        with pytest.raises(ProgrammingError) as error:
            connection.execute(text(statement))
        assert isinstance(error.value.orig, psycopg.errors.InsufficientPrivilege)
        connection.rollback()


def test_the_table_matches_its_migration(settings: Settings, db_engine: Engine) -> None:
    # Other domains' tables are compared by tests/test_migrations.py.
    audit_only = MetaData(naming_convention=Base.metadata.naming_convention)
    Base.metadata.tables[AuditEventRow.__tablename__].to_metadata(audit_only)
    owner = create_engine(str(settings.migration_database_url))
    try:
        with owner.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "include_name": lambda name, kind, _parent: (
                        kind != "table" or name == "audit_event"
                    )
                },
            )
            assert compare_metadata(context, audit_only) == []
    finally:
        owner.dispose()


# --- the HTTP edge ------------------------------------------------------------------------


class PrincipalFromBearer:
    """Put the Principal of a valid dev-issuer token on the request state, as Waha's auth does."""

    def __init__(self, app: ASGIApp, *, validator: TokenValidator) -> None:
        self.app = app
        self.validator = validator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            bearer = headers.get(b"authorization", b"").decode("latin-1")
            if bearer.startswith("Bearer "):
                try:
                    principal = self.validator.validate(bearer.removeprefix("Bearer "))
                except InvalidToken:
                    principal = None
                scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def audit_app(settings: Settings, db_engine: Engine) -> FastAPI:
    """An app serving the audit router behind real dev-issuer token validation."""
    application = FastAPI()
    install_error_handlers(application)
    application.state.settings = settings
    validator = TokenValidator.from_settings(settings)
    application.add_middleware(PrincipalFromBearer, validator=validator)
    application.include_router(audit_router)
    return application


@pytest.fixture
def audit_client(audit_app: FastAPI, session: Session) -> Iterator[TestClient]:
    """An HTTP client whose requests join the test's rolled-back transaction."""
    with TestClient(audit_app, raise_server_exceptions=False) as test_client:
        yield test_client


Headers = Callable[[str], dict[str, str]]


def search(client: TestClient, headers: Headers, query: str, **extra: str) -> dict[str, Any]:
    """Run an admin search and return the searchset Bundle."""
    response = client.get(f"/fhir/AuditEvent?{query}", headers={**headers("admin"), **extra})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle: dict[str, Any] = response.json()
    assert bundle["type"] == "searchset"
    return bundle


def matched_requests(bundle: dict[str, Any]) -> list[str]:
    """Return the request ids of the matched events, in bundle order."""
    return [
        entity["what"]["identifier"]["value"]
        for entry in bundle["entry"]
        if entry["search"]["mode"] == "match"
        for entity in entry["resource"]["entity"]
        if entity["type"]["code"] == "XrequestId"
    ]


@pytest.fixture
def trail(session: Session) -> dict[str, str]:
    """Five events about one fresh patient, an hour apart; returns name → request id."""
    patient = f"p-{uuid.uuid4().hex[:12]}"
    names = ["read", "create", "search", "delete", "denied"]
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in names}
    records = [
        audit_record(request_id=ids["read"], patient_ids=(patient,), recorded=MOMENT),
        audit_record(
            request_id=ids["create"],
            action="C",
            subtype="create",
            patient_ids=(patient,),
            entity_refs=(f"Observation/obs-{patient}",),
            recorded=MOMENT + timedelta(hours=1),
        ),
        audit_record(
            request_id=ids["search"],
            principal=ADMIN,
            subtype="search-type",
            patient_ids=(patient,),
            source_address="192.168.7.9",
            recorded=MOMENT + timedelta(hours=2),
        ),
        audit_record(
            request_id=ids["delete"],
            action="D",
            subtype="delete",
            patient_ids=(patient,),
            recorded=MOMENT + timedelta(days=1),
        ),
        audit_record(
            request_id=ids["denied"],
            outcome="4",
            patient_ids=(patient,),
            recorded=MOMENT + timedelta(days=40),
        ),
    ]
    service.record(db.session_factory, records)
    return {"patient": patient, **ids}


def test_search_by_patient_is_newest_first(
    audit_client: TestClient, auth_headers: Headers, trail: dict[str, str]
) -> None:
    order = [trail[name] for name in ("denied", "delete", "search", "create", "read")]
    bundle = search(audit_client, auth_headers, f"patient=Patient/{trail['patient']}")
    assert matched_requests(bundle) == order
    assert bundle["total"] == 5
    assert (
        matched_requests(search(audit_client, auth_headers, f"patient={trail['patient']}")) == order
    )
    assert (
        matched_requests(search(audit_client, auth_headers, "patient=Patient/nobody-at-all")) == []
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("entity=Observation/obs-{patient}", ["create"]),
        ("entity=Patient/{patient}&action=D", ["delete"]),
        ("action=C,D", ["delete", "create"]),
        ("subtype=http://hl7.org/fhir/restful-interaction|search-type", ["search"]),
        ("subtype=create", ["create"]),
        ("subtype=http://example.org/other|create", []),
        ("outcome=4", ["denied"]),
        ("agent=admin", ["search"]),
        ("agent=Device/unit-01&outcome=0&action=R", ["read"]),
        ("address=192.168", ["search"]),
        ("address:exact=192.168", []),
        ("address:exact=192.168.7.9", ["search"]),
        ("date=2031-05-17", ["search", "create", "read"]),
        ("date=2031-05", ["delete", "search", "create", "read"]),
        ("date=2031", ["denied", "delete", "search", "create", "read"]),
        ("date=2031-05-17T11:30", ["create"]),
        ("date=2031-05-17T11:30:00Z", ["create"]),
        ("date=2031-05-17T13:30:00+02:00", ["create"]),
        ("date=ge2031-05-17T11:30&date=lt2031-05-18", ["search", "create"]),
        ("date=gt2031-05-17", ["denied", "delete"]),
        ("date=le2031-05-17T10:30", ["read"]),
        ("date=ne2031-05-17", ["denied", "delete"]),
        ("date=eb2031-05-17T11:00,sa2031-05-31", ["denied", "read"]),
    ],
)
def test_search_by_each_parameter(
    audit_client: TestClient,
    auth_headers: Headers,
    trail: dict[str, str],
    query: str,
    expected: list[str],
) -> None:
    patient_filter = f"patient={trail['patient']}&"
    bundle = search(
        audit_client, auth_headers, patient_filter + query.format(patient=trail["patient"])
    )
    assert matched_requests(bundle) == [trail[name] for name in expected]


def test_search_and_read_by_id(
    audit_client: TestClient, auth_headers: Headers, trail: dict[str, str]
) -> None:
    bundle = search(audit_client, auth_headers, f"patient={trail['patient']}&outcome=4")
    [entry] = bundle["entry"]
    event_id = entry["resource"]["id"]
    assert entry["fullUrl"].endswith(f"/fhir/AuditEvent/{event_id}")
    by_id = search(audit_client, auth_headers, f"_id={event_id}")
    assert matched_requests(by_id) == [trail["denied"]]
    response = audit_client.get(f"/fhir/AuditEvent/{event_id}", headers=auth_headers("admin"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.json() == entry["resource"]


def test_read_of_an_unknown_event_is_404(audit_client: TestClient, auth_headers: Headers) -> None:
    response = audit_client.get(f"/fhir/AuditEvent/{uuid.uuid4()}", headers=auth_headers("admin"))
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"
    assert response.json()["issue"][0]["code"] == "not-found"


def test_paging_follows_next_links_to_the_end(
    audit_client: TestClient, auth_headers: Headers, trail: dict[str, str]
) -> None:
    query = f"patient={trail['patient']}&_count=2&_total=accurate"
    seen: list[str] = []
    bundle = search(audit_client, auth_headers, query)
    pages = 1
    while True:
        assert bundle["total"] == 5
        seen.extend(matched_requests(bundle))
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert "_cursor" not in links["first"]
        if "next" not in links:
            break
        assert urlsplit(links["next"]).path == "/fhir/AuditEvent"
        bundle = search(audit_client, auth_headers, urlsplit(links["next"]).query)
        pages += 1
    assert pages == 3
    assert seen == [trail[name] for name in ("denied", "delete", "search", "create", "read")]


def test_count_zero_answers_only_the_total(
    audit_client: TestClient, auth_headers: Headers, trail: dict[str, str]
) -> None:
    bundle = search(audit_client, auth_headers, f"patient={trail['patient']}&_count=0")
    assert bundle["total"] == 5
    assert bundle["entry"] == []


def test_unknown_parameters_are_reported_or_refused(
    audit_client: TestClient, auth_headers: Headers, trail: dict[str, str]
) -> None:
    bundle = search(
        audit_client, auth_headers, f"patient={trail['patient']}&colour=blue&_format=json"
    )
    assert len(matched_requests(bundle)) == 5
    outcome = bundle["entry"][-1]
    assert outcome["search"] == {"mode": "outcome"}
    assert "'colour'" in outcome["resource"]["issue"][0]["diagnostics"]
    assert len(outcome["resource"]["issue"]) == 1
    strict = audit_client.get(
        f"/fhir/AuditEvent?patient={trail['patient']}&colour=blue",
        headers={**auth_headers("admin"), "Prefer": "handling=strict"},
    )
    assert strict.status_code == 400
    assert strict.json()["issue"][0]["code"] == "not-supported"


@pytest.mark.parametrize(
    "query",
    [
        "date=2031-13",
        "date=yesterday",
        "date=ap2031-05-17",
        "date=2031-05-17T25:00",
        "patient=",
        "patient=Observation/1",
        "entity=obs-1",
        "action:not=R",
        "_count=many",
        "_count=-1",
        "_total=maybe",
        "_cursor=not-a-cursor",
        "_cursor=WyJ4Il0",
    ],
)
def test_malformed_searches_are_400(
    audit_client: TestClient, auth_headers: Headers, query: str
) -> None:
    response = audit_client.get(f"/fhir/AuditEvent?{query}", headers=auth_headers("admin"))
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "invalid"


@pytest.mark.parametrize("name", ["coordinator", "specialist.derm", "relay", "ministry", "unit-01"])
def test_only_an_admin_reads_the_trail(
    audit_client: TestClient, auth_headers: Headers, name: str
) -> None:
    for path in ("/fhir/AuditEvent", f"/fhir/AuditEvent/{uuid.uuid4()}"):
        response = audit_client.get(path, headers=auth_headers(name))
        assert response.status_code == 403, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.json()["issue"][0]["code"] == "forbidden"


def test_an_anonymous_caller_is_401(audit_client: TestClient) -> None:
    response = audit_client.get("/fhir/AuditEvent")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/fhir/AuditEvent", "/fhir/AuditEvent/some-id"])
def test_nobody_writes_the_trail_through_the_api(
    audit_client: TestClient, auth_headers: Headers, method: str, path: str
) -> None:
    response = audit_client.request(
        method,
        path,
        headers={**auth_headers("admin"), "Content-Type": "application/fhir+json"},
        content=b'{"resourceType": "AuditEvent"}',
    )
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "not-supported"
