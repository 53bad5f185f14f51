"""The audit trail: record every interaction as an IHE BALP AuditEvent, and let admins read it.

Recording runs on every request, so the FHIR JSON is built from plain dicts and
written with one COPY in its own short transaction (DESIGN.md "Access rules"):
a request whose own transaction rolls back, denied or failed, is still audited.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import urlencode

import orjson
import structlog
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from auth.audit import repository
from auth.audit.errors import (
    AuditEventNotFound,
    AuditReadForbidden,
    AuditUnavailable,
    InvalidAuditSearch,
    UnknownAuditSearchParameter,
)
from auth.audit.repository import AuditFilter, DateBound
from auth.errors import MissingToken
from auth.tokens import Principal

log = structlog.get_logger()

JSONObject = dict[str, Any]

AUDIT_READER_ROLE = "admin"

RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
LOGIN_SUBTYPE = "login"
SUBTYPES = frozenset(
    {
        "read",
        "vread",
        "history-instance",
        "history-type",
        "history-system",
        "search-type",
        "search-system",
        "create",
        "update",
        "patch",
        "delete",
        "batch",
        "transaction",
        "operation",
        LOGIN_SUBTYPE,
    }
)
ACTIONS = frozenset({"C", "R", "U", "D", "E"})
OUTCOMES = frozenset({"0", "4", "8", "12"})
_ACTION_BY_SUBTYPE = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "search-type": "R",
    "search-system": "R",
    "update": "U",
    "patch": "U",
    "delete": "D",
}
_QUERY_SUBTYPES = frozenset({"search-type", "search-system"})

# Codings of the IHE Basic Audit Log Patterns (BALP) profiles of R4 AuditEvent.
_EVENT_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "Restful Operation",
}
_LOGIN_TYPE = {
    "system": "http://dicom.nema.org/resources/ontology/DCM",
    "code": "110114",
    "display": "User Authentication",
}
_USER_AGENT_TYPE = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "IRCP",
            "display": "information recipient",
        }
    ]
}
_CLIENT_AGENT_TYPE = {
    "coding": [
        {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110153",
            "display": "Source Role ID",
        }
    ]
}
_SERVER_AGENT_TYPE = {
    "coding": [
        {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110152",
            "display": "Destination Role ID",
        }
    ]
}
_SOURCE = {
    "site": "Waha",
    "observer": {"display": "Waha"},
    "type": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
            "code": "4",
            "display": "Application Server",
        }
    ],
}
_PERSON_ENTITY = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "1",
    "display": "Person",
}
_OBJECT_ENTITY = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "2",
    "display": "System Object",
}
_PATIENT_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "1",
    "display": "Patient",
}
_RESOURCE_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "4",
    "display": "Domain Resource",
}
_QUERY_ROLE = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "24",
    "display": "Query",
}
_REQUEST_ID_ENTITY = {
    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
    "code": "XrequestId",
    "display": "X-Request-Id",
}
CLIENT_ID_SYSTEM = "https://waha.health/fhir/sid/oauth-client"
USER_ID_SYSTEM = "https://waha.health/fhir/sid/oidc-subject"
_IP_ADDRESS = "2"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What one audited interaction was: filled by the per-request audit hook."""

    action: str
    subtype: str
    outcome: str
    outcome_description: str | None
    principal: Principal | None
    client_id: str | None
    source_address: str | None
    request_id: str | None
    method: str
    path: str
    query: str | None = None
    entity_refs: Sequence[str] = ()
    patient_ids: Sequence[str] = ()
    recorded: datetime = field(default_factory=_now)


def action_for(subtype: str) -> str:
    """Return the AuditEvent action code (C/R/U/D/E) of a restful-interaction subtype."""
    return _ACTION_BY_SUBTYPE.get(subtype, "E")


def outcome_for_status(status: int) -> str:
    """Return the AuditEvent outcome code of an HTTP status (0 success, 4 minor, 8 serious)."""
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "8"


def record(bind: Engine | sessionmaker[Session], records: Sequence[AuditRecord]) -> None:
    """Write audit events in their own short transaction, apart from any request's session.

    Raise AuditUnavailable when they cannot be written: Waha does not serve unaudited.
    """
    if not records:
        return
    rows = [_row(item) for item in records]
    for attempt in (1, 2):
        try:
            with _open(bind) as session:
                if isinstance(session.get_bind(), Engine):
                    # One self-committing statement: no BEGIN and COMMIT round trips.
                    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                    repository.add_events(session, rows)
                else:
                    # Bound to a caller's connection (tests): join its transaction.
                    with session.begin():
                        repository.add_events(session, rows)
            return
        except DBAPIError as error:
            # A pooled connection a database restart broke: the pool is now
            # invalidated and one more attempt runs on a fresh connection.
            if attempt == 1 and error.connection_invalidated:
                continue
            _unavailable(error, len(rows))
        except SQLAlchemyError as error:
            _unavailable(error, len(rows))


def _unavailable(error: SQLAlchemyError, events: int) -> NoReturn:
    log.error("auth.audit_write_failed", events=events, error_type=type(error).__name__)
    raise AuditUnavailable("the audit trail cannot be written") from error


def _open(bind: Engine | sessionmaker[Session]) -> Session:
    return bind() if isinstance(bind, sessionmaker) else Session(bind)


def agent_who(principal: Principal | None) -> str | None:
    """Return who a principal is in the trail: `Device/<unit>` for units, else the user."""
    if principal is None:
        return None
    if principal.unit and principal.has_role("unit"):
        return f"Device/{principal.unit}"
    return principal.username or principal.subject


def _row(item: AuditRecord) -> tuple[Any, ...]:
    if item.action not in ACTIONS or item.outcome not in OUTCOMES:
        raise ValueError(f"not an AuditEvent action/outcome: {item.action}/{item.outcome}")
    recorded = item.recorded if item.recorded.tzinfo else item.recorded.replace(tzinfo=UTC)
    event_id = str(uuid.uuid4())
    patient_ids = list(dict.fromkeys(item.patient_ids))
    entity_refs = list(
        dict.fromkeys([*(f"Patient/{patient}" for patient in patient_ids), *item.entity_refs])
    )
    principal = item.principal
    client_id = item.client_id or (principal.client_id if principal is not None else None)
    who = agent_who(principal)
    resource = _resource(
        item,
        event_id=event_id,
        recorded=recorded,
        who=who,
        client_id=client_id,
        patient_ids=patient_ids,
        entity_refs=entity_refs,
    )
    return (
        event_id,
        recorded,
        item.action,
        item.subtype,
        item.outcome,
        who,
        client_id,
        sorted(principal.roles) if principal is not None else [],
        item.source_address,
        item.request_id,
        patient_ids,
        entity_refs,
        resource,
    )


def _resource(
    item: AuditRecord,
    *,
    event_id: str,
    recorded: datetime,
    who: str | None,
    client_id: str | None,
    patient_ids: list[str],
    entity_refs: list[str],
) -> JSONObject:
    network = {"address": item.source_address, "type": _IP_ADDRESS} if item.source_address else None
    agents = [_user_agent(item.principal, who, network)]
    if client_id is not None:
        client: JSONObject = {
            "type": _CLIENT_AGENT_TYPE,
            "who": {
                "identifier": {"system": CLIENT_ID_SYSTEM, "value": client_id},
                "display": client_id,
            },
            "requestor": False,
        }
        if network is not None:
            client["network"] = network
        agents.append(client)
    agents.append({"type": _SERVER_AGENT_TYPE, "who": {"display": "Waha"}, "requestor": False})

    entities: list[JSONObject] = [
        {"what": {"reference": f"Patient/{patient}"}, "type": _PERSON_ENTITY, "role": _PATIENT_ROLE}
        for patient in patient_ids
    ]
    patient_refs = {f"Patient/{patient}" for patient in patient_ids}
    entities.extend(
        {"what": {"reference": reference}, "type": _OBJECT_ENTITY, "role": _RESOURCE_ROLE}
        for reference in entity_refs
        if reference not in patient_refs
    )
    if item.subtype in _QUERY_SUBTYPES:
        request_line = f"{item.path}?{item.query}" if item.query else item.path
        entities.append(
            {
                "type": _OBJECT_ENTITY,
                "role": _QUERY_ROLE,
                "query": base64.b64encode(request_line.encode()).decode("ascii"),
            }
        )
    if item.request_id:
        entities.append(
            {"type": _REQUEST_ID_ENTITY, "what": {"identifier": {"value": item.request_id}}}
        )

    is_login = item.subtype == LOGIN_SUBTYPE
    resource: JSONObject = {
        "resourceType": "AuditEvent",
        "id": event_id,
        "type": _LOGIN_TYPE if is_login else _EVENT_TYPE,
        "subtype": [
            {"system": RESTFUL_INTERACTION, "code": item.subtype}
            if not is_login
            else {"system": _LOGIN_TYPE["system"], "code": "110122", "display": "Login"}
        ],
        "action": item.action,
        "recorded": recorded.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "outcome": item.outcome,
        "agent": agents,
        "source": _SOURCE,
    }
    if item.outcome_description:
        resource["outcomeDesc"] = item.outcome_description
    if entities:
        resource["entity"] = entities
    return resource


def _user_agent(
    principal: Principal | None, who: str | None, network: JSONObject | None
) -> JSONObject:
    agent: JSONObject = {"type": _USER_AGENT_TYPE, "requestor": True}
    if principal is None:
        agent["who"] = {"display": "anonymous"}
    elif who is not None and who.startswith("Device/"):
        agent["who"] = {"reference": who, "display": who.removeprefix("Device/")}
    else:
        agent["who"] = {
            "identifier": {"system": USER_ID_SYSTEM, "value": principal.subject},
            "display": who,
        }
        if principal.username:
            agent["altId"] = principal.username
    if network is not None:
        agent["network"] = network
    return agent


# --- reading the trail ------------------------------------------------------------------


def require_audit_reader(principal: Principal | None) -> None:
    """Refuse anyone but an admin: the trail names every patient and every user."""
    if principal is None:
        raise MissingToken()
    if not principal.has_role(AUDIT_READER_ROLE):
        raise AuditReadForbidden("only an admin may read AuditEvent")


def read_event(session: Session, *, principal: Principal | None, event_id: str) -> JSONObject:
    """Return one AuditEvent to an admin."""
    require_audit_reader(principal)
    resource = repository.get_event(session, event_id)
    if resource is None:
        raise AuditEventNotFound(f"AuditEvent/{event_id} is not known")
    return resource


@dataclass(frozen=True, slots=True)
class AuditSearch:
    """A parsed AuditEvent search: filters, page size, cursor and what was ignored."""

    filters: tuple[AuditFilter, ...]
    pairs: tuple[tuple[str, str], ...]
    count: int
    cursor: str | None
    total_accurate: bool
    ignored: tuple[str, ...]


# Parameters whose values are ignored without a warning: they change the
# representation, not the result.
_SILENT_PARAMETERS = frozenset({"_format", "_pretty"})
_DATE_PREFIXES = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"})
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_TIME_ZONE = re.compile(r"(Z|[+-]\d{2}:\d{2})$")
_TOKEN_FIELDS = {"action": "action", "subtype": "subtype", "outcome": "outcome", "_id": "id"}


def parse_search(
    pairs: Sequence[tuple[str, str]], *, default_count: int, max_count: int, strict: bool
) -> AuditSearch:
    """Parse AuditEvent search parameters with R4 semantics, or raise a 400."""
    filters: list[AuditFilter] = []
    kept: list[tuple[str, str]] = []
    ignored: list[str] = []
    count = default_count
    cursor: str | None = None
    total_accurate = False
    for raw_name, raw_value in pairs:
        name, _, modifier = raw_name.partition(":")
        if name == "_cursor":
            cursor = raw_value
            continue
        if name in _SILENT_PARAMETERS:
            continue
        if name == "_count":
            count = _parse_count(raw_value, max_count)
        elif name == "_total":
            if raw_value not in ("none", "estimate", "accurate"):
                raise InvalidAuditSearch("_total must be none, estimate or accurate")
            total_accurate = raw_value == "accurate"
        else:
            parsed = _parse_filter(name, modifier, raw_value)
            if parsed is None:
                if strict:
                    raise UnknownAuditSearchParameter(
                        f"search parameter {raw_name!r} is not supported on AuditEvent"
                    )
                ignored.append(raw_name)
                continue
            filters.append(parsed)
        kept.append((raw_name, raw_value))
    return AuditSearch(
        filters=tuple(filters),
        pairs=tuple(kept),
        count=count,
        cursor=cursor,
        total_accurate=total_accurate,
        ignored=tuple(ignored),
    )


def _parse_count(raw: str, max_count: int) -> int:
    try:
        count = int(raw)
    except ValueError as error:
        raise InvalidAuditSearch("_count must be a whole number") from error
    if count < 0:
        raise InvalidAuditSearch("_count must not be negative")
    return min(count, max_count)


def _values(name: str, raw: str) -> list[str]:
    values = [value.strip() for value in raw.split(",")]
    if not raw or any(not value for value in values):
        raise InvalidAuditSearch(f"{name}: a search value is empty")
    return values


def _no_modifier(name: str, modifier: str) -> None:
    if modifier:
        raise InvalidAuditSearch(f"{name}: the modifier :{modifier} is not supported")


# Messages name the parameter, never the value: search values are patient data.
def _parse_filter(name: str, modifier: str, raw: str) -> AuditFilter | None:
    match name:
        case "date":
            _no_modifier(name, modifier)
            return AuditFilter("recorded", dates=tuple(_date_bound(v) for v in _values(name, raw)))
        case "patient":
            _no_modifier(name, modifier)
            return AuditFilter("patient_ids", tuple(_patient_id(v) for v in _values(name, raw)))
        case "entity":
            _no_modifier(name, modifier)
            return AuditFilter("entity_refs", tuple(_reference(v) for v in _values(name, raw)))
        case "agent":
            _no_modifier(name, modifier)
            return AuditFilter("agent_who", tuple(_values(name, raw)))
        case "address":
            if modifier not in ("", "exact"):
                raise InvalidAuditSearch(f"{name}: the modifier :{modifier} is not supported")
            # `address` is a string parameter: case-insensitive starts-with unless :exact.
            return AuditFilter(
                "source_address", tuple(_values(name, raw)), prefix_match=modifier != "exact"
            )
        case "action" | "subtype" | "outcome" | "_id":
            _no_modifier(name, modifier)
            codes = tuple(_token_code(name, v) for v in _values(name, raw))
            return AuditFilter(_TOKEN_FIELDS[name], codes)
    return None


def _token_code(name: str, value: str) -> str:
    system, bar, code = value.rpartition("|")
    if not bar:
        return value
    if name == "subtype" and system not in ("", RESTFUL_INTERACTION):
        # A code of another system never matches a restful-interaction subtype.
        return f"{system}|{code}"
    return code


def _patient_id(value: str) -> str:
    if "/" not in value:
        return value
    kind, _, patient = value.rstrip("/").rpartition("/")
    if not kind.endswith("Patient") or not patient:
        raise InvalidAuditSearch("patient: a value is not a Patient reference")
    return patient


def _reference(value: str) -> str:
    parts = value.rstrip("/").split("/")
    if len(parts) < 2 or not parts[-2][:1].isupper() or not parts[-1]:
        raise InvalidAuditSearch("entity: a value is not a reference of the form Type/id")
    return f"{parts[-2]}/{parts[-1]}"


def _date_bound(value: str) -> DateBound:
    prefix = value[:2] if value[:2].isalpha() else "eq"
    rest = value[2:] if value[:2].isalpha() else value
    if prefix not in _DATE_PREFIXES:
        raise InvalidAuditSearch("date: a value has a prefix AuditEvent search does not support")
    # A `+` zone offset arrives as a space when the client did not escape it.
    low, high = date_range(rest.replace(" ", "+"))
    return DateBound(prefix, low, high)


def date_range(value: str) -> tuple[datetime, datetime]:
    """Return the half-open UTC range [low, high) a FHIR date or dateTime covers, by precision."""
    try:
        match = _PARTIAL_DATE.match(value)
        if match is not None:
            return _calendar_range(*match.groups())
        if len(value) < 16 or value[10] != "T":
            raise ValueError(value)
        clock = _TIME_ZONE.sub("", value[11:])
        if len(clock) == 5:
            width = timedelta(minutes=1)
        elif len(clock) == 8:
            width = timedelta(seconds=1)
        elif len(clock) > 9 and clock[8] == "." and clock[9:].isdigit():
            width = timedelta(microseconds=10 ** max(0, 6 - len(clock[9:])))
        else:
            raise ValueError(value)
        low = datetime.fromisoformat(value)
        # A dateTime without a zone is read as UTC: the server has no local zone.
        low = low.replace(tzinfo=UTC) if low.tzinfo is None else low.astimezone(UTC)
        return low, low + width
    except (ValueError, OverflowError) as error:
        raise InvalidAuditSearch("date: a value is not a FHIR date or dateTime") from error


def _calendar_range(year: str, month: str | None, day: str | None) -> tuple[datetime, datetime]:
    if month is None:
        return datetime(int(year), 1, 1, tzinfo=UTC), datetime(int(year) + 1, 1, 1, tzinfo=UTC)
    low = datetime(int(year), int(month), 1 if day is None else int(day), tzinfo=UTC)
    if day is not None:
        return low, low + timedelta(days=1)
    following = int(year) * 12 + int(month)  # month index of the next month
    return low, datetime(following // 12, following % 12 + 1, 1, tzinfo=UTC)


def search_events(
    session: Session,
    *,
    principal: Principal | None,
    search: AuditSearch,
    base_url: str,
) -> JSONObject:
    """Answer an admin's AuditEvent search as a searchset Bundle, newest first."""
    require_audit_reader(principal)
    before = _decode_cursor(search.cursor) if search.cursor is not None else None
    rows: list[tuple[datetime, str, JSONObject]] = []
    more = False
    if search.count > 0:
        rows = repository.list_events(
            session, search.filters, before=before, limit=search.count + 1
        )
        more = len(rows) > search.count
        rows = rows[: search.count]
    link_base = f"{base_url}/AuditEvent"
    links = [
        {"relation": "self", "url": _link(link_base, search.pairs, search.cursor)},
        {"relation": "first", "url": _link(link_base, search.pairs)},
    ]
    if more:
        last_recorded, last_id, _ = rows[-1]
        links.append(
            {
                "relation": "next",
                "url": _link(link_base, search.pairs, _encode_cursor(last_recorded, last_id)),
            }
        )
    bundle: JSONObject = {"resourceType": "Bundle", "type": "searchset"}
    if search.total_accurate or search.count == 0:
        bundle["total"] = repository.count_events(session, search.filters)
    elif before is None and not more:
        # The whole result is on this first page: its size is the total, for free.
        bundle["total"] = len(rows)
    bundle["link"] = links
    entries: list[JSONObject] = [
        {
            "fullUrl": f"{link_base}/{event_id}",
            "resource": resource,
            "search": {"mode": "match"},
        }
        for _, event_id, resource in rows
    ]
    if search.ignored:
        entries.append(_ignored_outcome(search.ignored))
    bundle["entry"] = entries
    return bundle


def _encode_cursor(recorded: datetime, event_id: str) -> str:
    raw = orjson.dumps([recorded.isoformat(), event_id])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(v, str) for v in raw)):
            raise ValueError(token)
        recorded = datetime.fromisoformat(raw[0])
        if recorded.tzinfo is None:
            raise ValueError(token)
    except (ValueError, orjson.JSONDecodeError) as error:
        raise InvalidAuditSearch("the paging cursor is not one Waha issued") from error
    return recorded, raw[1]


def _link(link_base: str, pairs: Sequence[tuple[str, str]], cursor: str | None = None) -> str:
    items = list(pairs)
    if cursor is not None:
        items.append(("_cursor", cursor))
    return f"{link_base}?{urlencode(items, safe=':,/|')}" if items else link_base


def _ignored_outcome(names: Sequence[str]) -> JSONObject:
    return {
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"search parameter {name!r} is unknown here and was ignored",
                }
                for name in names
            ],
        },
        "search": {"mode": "outcome"},
    }
