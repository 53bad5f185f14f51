"""Reads of the record store: read, vread, history, $everything and GET entries."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from sqlalchemy.orm import Session

from fhir_api import repository
from fhir_api import search as search_service
from fhir_api.context import UNRESTRICTED_ACCESS, AccessControl, AuditNotes
from fhir_api.errors import ResourceGone, ResourceNotFound, UnparsableBody
from fhir_api.scope import search_scope
from fhir_api.validation import JSONObject, check_resource_type, check_url_id
from fhir_api.writes import EntryRequest, EntryResult, format_instant


@dataclass(frozen=True, slots=True)
class Page:
    """Paging inputs of a Bundle-returning read."""

    count: int
    cursor: str | None


def encode_cursor(values: list[Any]) -> str:
    """Encode a keyset position as an opaque URL-safe token."""
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(token: str) -> list[Any]:
    """Decode a keyset position, or raise a 400 for a mangled token."""
    try:
        padded = token + "=" * (-len(token) % 4)
        value = orjson.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, orjson.JSONDecodeError) as error:
        raise UnparsableBody("the paging cursor is not one Waha issued") from error
    if not isinstance(value, list):
        raise UnparsableBody("the paging cursor is not one Waha issued")
    return value


def read_resource(
    session: Session,
    *,
    resource_type: str,
    resource_id: str,
    access: AccessControl = UNRESTRICTED_ACCESS,
    audit: AuditNotes | None = None,
) -> EntryResult:
    """Return the current version; 404 when absent or not the caller's, 410 when deleted."""
    check_resource_type(resource_type)
    check_url_id(resource_type, resource_id)
    row = repository.get_current(
        session,
        resource_type,
        resource_id,
        condition=access.row_condition(repository.RESOURCE),
    )
    if row is None:
        raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
    if audit is not None:
        audit.touched(resource_type, resource_id, row.patient_ids)
    if row.deleted:
        error = ResourceGone(f"{resource_type}/{resource_id} was deleted")
        error.headers["ETag"] = f'W/"{row.version_id}"'
        raise error
    return EntryResult(
        200, resource_type, resource_id, row.version_id, row.last_updated, row.resource
    )


def vread_resource(
    session: Session,
    *,
    resource_type: str,
    resource_id: str,
    version_id: str,
    access: AccessControl = UNRESTRICTED_ACCESS,
    audit: AuditNotes | None = None,
) -> EntryResult:
    """Return one version; 410 for the version that recorded a deletion."""
    check_resource_type(resource_type)
    check_url_id(resource_type, resource_id)
    _check_visible(session, resource_type, resource_id, access, audit)
    if not version_id.isdigit():
        raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version_id!r}")
    row = repository.get_version(
        session,
        resource_type,
        resource_id,
        int(version_id),
        condition=access.row_condition(repository.VERSION),
    )
    if row is None:
        raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version_id}")
    if row.deleted:
        raise ResourceGone(f"version {version_id} of {resource_type}/{resource_id} is a deletion")
    return EntryResult(
        200, resource_type, resource_id, row.version_id, row.last_updated, row.resource
    )


def _check_visible(
    session: Session,
    resource_type: str,
    resource_id: str,
    access: AccessControl,
    audit: AuditNotes | None,
) -> None:
    """Raise 404 unless the resource exists (even deleted) and the caller may see it."""
    row = repository.get_current(
        session, resource_type, resource_id, condition=access.row_condition(repository.RESOURCE)
    )
    if row is None:
        raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
    if audit is not None:
        audit.touched(resource_type, resource_id, row.patient_ids)


def history_bundle(
    session: Session,
    *,
    base_url: str,
    resource_type: str | None,
    resource_id: str | None,
    since: datetime | None,
    page: Page,
    self_link: str,
    access: AccessControl = UNRESTRICTED_ACCESS,
    audit: AuditNotes | None = None,
) -> JSONObject:
    """Return a history Bundle, newest version first, paged by keyset."""
    if resource_type is not None:
        check_resource_type(resource_type)
    if resource_id is not None:
        assert resource_type is not None  # noqa: S101
        check_url_id(resource_type, resource_id)
        _check_visible(session, resource_type, resource_id, access, audit)
    before = None
    if page.cursor:
        raw = decode_cursor(page.cursor)
        if len(raw) != 4:
            raise UnparsableBody("the paging cursor is not one Waha issued")
        before = (datetime.fromisoformat(raw[0]), raw[1], raw[2], int(raw[3]))
    rows = repository.list_history(
        session,
        resource_type=resource_type,
        resource_id=resource_id,
        since=since,
        before=before,
        limit=page.count + 1,
        condition=access.row_condition,
    )
    more = len(rows) > page.count
    rows = rows[: page.count]
    entries: list[JSONObject] = []
    for row in rows:
        full_url = f"{base_url}/{row.resource_type}/{row.id}"
        entry: JSONObject = {"fullUrl": full_url}
        if row.resource is not None:
            entry["resource"] = row.resource
        if row.deleted:
            request = {"method": "DELETE", "url": f"{row.resource_type}/{row.id}"}
            status = "204 No Content"
        elif row.version_id == 1:
            request = {"method": "POST", "url": row.resource_type}
            status = "201 Created"
        else:
            request = {"method": "PUT", "url": f"{row.resource_type}/{row.id}"}
            status = "200 OK"
        entry["request"] = request
        entry["response"] = {
            "status": status,
            "etag": f'W/"{row.version_id}"',
            "lastModified": format_instant(row.last_updated),
        }
        entries.append(entry)
    bundle: JSONObject = {
        "resourceType": "Bundle",
        "type": "history",
        "link": [{"relation": "self", "url": self_link}],
        "entry": entries,
    }
    # Bundle.total is optional for history. One resource's versions are cheap to
    # count; a type's or the system's are not (22 ms per page at 1.2M versions),
    # so those get a total only when the whole history fits on this first page.
    if resource_id is not None:
        bundle["total"] = repository.count_history(
            session,
            resource_type=resource_type,
            resource_id=resource_id,
            since=since,
            condition=access.row_condition(repository.VERSION),
        )
    elif not more and not page.cursor:
        bundle["total"] = len(rows)
    if more and rows:
        last = rows[-1]
        cursor = encode_cursor(
            [last.last_updated.isoformat(), last.resource_type, last.id, last.version_id]
        )
        bundle["link"].append(
            {"relation": "next", "url": _with_param(self_link, "_cursor", cursor)}
        )
    return bundle


def _with_param(url: str, name: str, value: str) -> str:
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith(f"{name}=")]
    kept.append(urlencode({name: value}))
    return f"{base}?{'&'.join(kept)}"


def everything_bundle(
    session: Session,
    *,
    base_url: str,
    patient_id: str,
    types: list[str] | None,
    since: datetime | None,
    page: Page,
    self_link: str,
    access: AccessControl = UNRESTRICTED_ACCESS,
    audit: AuditNotes | None = None,
) -> JSONObject:
    """Return a page of Patient/$everything: the compartment and what it references."""
    # A visible Patient means a visible compartment: the whole record is one grant.
    read_resource(
        session, resource_type="Patient", resource_id=patient_id, access=access, audit=audit
    )
    for resource_type in types or ():
        check_resource_type(resource_type)
    after = None
    if page.cursor:
        raw = decode_cursor(page.cursor)
        if len(raw) != 2:
            raise UnparsableBody("the paging cursor is not one Waha issued")
        after = (str(raw[0]), str(raw[1]))
    rows = repository.list_compartment(
        session,
        patient_id=patient_id,
        types=types,
        since=since,
        after=after,
        limit=page.count + 1,
        condition=access.row_condition,
    )
    more = len(rows) > page.count
    rows = rows[: page.count]
    bundle: JSONObject = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": [{"relation": "self", "url": self_link}],
        "entry": [
            {
                "fullUrl": f"{base_url}/{row[0]}/{row[1]}",
                "resource": orjson.Fragment(row[2]),
                "search": {"mode": "match"},
            }
            for row in rows
        ],
    }
    if more and rows:
        cursor = encode_cursor([rows[-1][0], rows[-1][1]])
        bundle["link"].append(
            {"relation": "next", "url": _with_param(self_link, "_cursor", cursor)}
        )
    return bundle


def search_bundle(
    session: Session,
    *,
    base_url: str,
    resource_type: str,
    query: str,
    strict: bool = False,
    access: AccessControl = UNRESTRICTED_ACCESS,
) -> JSONObject:
    """Answer a search given as a query string (a GET entry of a batch Bundle)."""
    access.check("search", resource_type)
    return search_service.search(
        session,
        resource_type=resource_type,
        pairs=parse_qsl(query, keep_blank_values=True),
        base_url=base_url,
        strict=strict,
        scope=search_scope(access),
    )


def read_entry(
    session: Session,
    entry: EntryRequest,
    *,
    base_url: str,
    access: AccessControl = UNRESTRICTED_ACCESS,
    audit: AuditNotes | None = None,
) -> EntryResult:
    """Answer a GET or HEAD entry of a Bundle."""
    if entry.resource_type is None:
        raise UnparsableBody("a GET entry must name a resource type")
    if entry.query is not None and entry.resource_id is None:
        bundle = search_bundle(
            session,
            base_url=base_url,
            resource_type=entry.resource_type,
            query=entry.query,
            access=access,
        )
        return EntryResult(200, entry.resource_type, search_bundle=bundle)
    if entry.resource_id is None:
        raise UnparsableBody("a GET entry must name a resource or a search")
    access.check("read", entry.resource_type)
    if entry.version_id is not None:
        return vread_resource(
            session,
            resource_type=entry.resource_type,
            resource_id=entry.resource_id,
            version_id=entry.version_id,
            access=access,
            audit=audit,
        )
    return read_resource(
        session,
        resource_type=entry.resource_type,
        resource_id=entry.resource_id,
        access=access,
        audit=audit,
    )
