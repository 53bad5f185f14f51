"""All SQL of the record store. Writes are batched into a few multi-row statements."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from typing import cast as typing_cast

import orjson
from psycopg.types.json import Jsonb
from sqlalchemy import (
    ColumnElement,
    FromClause,
    Row,
    Table,
    Text,
    TextClause,
    and_,
    cast,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from fhir_api.models import (
    ResourceRow,
    ResourceVersionRow,
    SearchDateRow,
    SearchQuantityRow,
    SearchStringRow,
    SearchUriRow,
)
from fhir_api.search_index import IndexValues
from hub.db import copy_rows

SIDE_TABLES = (SearchStringRow, SearchDateRow, SearchQuantityRow, SearchUriRow)
RESOURCE = typing_cast(Table, ResourceRow.__table__)
# The current row of a historical version, where the caller's scope is checked.
CURRENT = RESOURCE.alias("current_row")
VERSION = typing_cast(Table, ResourceVersionRow.__table__)


@dataclass(slots=True)
class VersionWrite:
    """One new version of one resource, ready to be written."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    method: str
    deleted: bool
    author: str
    resource: dict[str, Any] | None
    index: IndexValues | None
    replaces_existing: bool
    # A deletion keeps the patients of the version it ends: its tombstone and
    # history stay theirs (an empty list would make them everyone's).
    kept_patient_ids: Sequence[str] = ()


def lock_key(text_key: str) -> int:
    """Map a text key to a signed 64-bit advisory-lock key."""
    digest = hashlib.blake2b(text_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_keys(session: Session, keys: Iterable[str], *, timeout_ms: int | None = None) -> None:
    """Take transaction-scoped advisory locks in one statement, in a fixed order.

    Every writer locks in ascending key order, so bundles that share keys queue
    instead of deadlocking. With `timeout_ms` the wait is bounded for the rest of
    the transaction (set_config runs before the locks in the target list).
    """
    numbers = sorted({lock_key(k) for k in keys})
    if not numbers:
        return
    if timeout_ms is None:
        session.execute(
            text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k"),
            {"keys": numbers},
        )
        return
    session.execute(
        text(
            "SELECT set_config('lock_timeout', :timeout, true), "
            "(SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k)"
        ),
        {"keys": numbers, "timeout": f"{timeout_ms}ms"},
    )


def get_current(
    session: Session,
    resource_type: str,
    resource_id: str,
    *,
    condition: ColumnElement[bool] | None = None,
) -> ResourceRow | None:
    """Return the current row of a resource, tombstones included, if `condition` holds."""
    statement = (
        select(ResourceRow)
        .where(ResourceRow.resource_type == resource_type, ResourceRow.id == resource_id)
        .execution_options(populate_existing=True)
    )
    if condition is not None:
        statement = statement.where(condition)
    return session.execute(statement).scalar_one_or_none()


# Fixed SQL texts on the ingest path: compiled once by SQLAlchemy and, being
# the same string every time, prepared once per connection by psycopg.
_CURRENT_VERSIONS = text(
    "SELECT r.resource_type, r.id, r.version_id, r.deleted, r.patient_ids FROM fhir_resource AS r "
    "JOIN unnest(CAST(:types AS text[]), CAST(:ids AS text[])) AS k(resource_type, id) "
    "USING (resource_type, id)"
)


class CurrentVersion(NamedTuple):
    """What a write needs to know of a resource's current row."""

    version_id: int
    deleted: bool
    patient_ids: list[str]


def list_current_versions(
    session: Session, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], CurrentVersion]:
    """Return the current version of each existing (type, id) among `keys`."""
    if not keys:
        return {}
    rows = session.execute(
        _CURRENT_VERSIONS, {"types": [k[0] for k in keys], "ids": [k[1] for k in keys]}
    )
    return {
        (r.resource_type, r.id): CurrentVersion(r.version_id, r.deleted, list(r.patient_ids))
        for r in rows
    }


_CURRENT_DOCUMENTS = text(
    "SELECT r.resource_type, r.id, r.last_updated, r.resource FROM fhir_resource AS r "
    "JOIN unnest(CAST(:types AS text[]), CAST(:ids AS text[])) AS k(resource_type, id) "
    "USING (resource_type, id) WHERE r.deleted IS false"
)


def list_current_documents(
    session: Session, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[datetime, dict[str, Any]]]:
    """Return (last_updated, document) of each undeleted (type, id) among `keys`."""
    if not keys:
        return {}
    rows = session.execute(
        _CURRENT_DOCUMENTS, {"types": [k[0] for k in keys], "ids": [k[1] for k in keys]}
    )
    return {(r.resource_type, r.id): (r.last_updated, r.resource) for r in rows}


def list_existing(session: Session, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Return which (type, id) pairs exist and are not deleted."""
    versions = list_current_versions(session, keys)
    return {key for key, version in versions.items() if not version.deleted}


def list_existing_versions(
    session: Session, keys: Sequence[tuple[str, str, int]]
) -> set[tuple[str, str, int]]:
    """Return which (type, id, version) triples are stored versions (deletions excluded)."""
    if not keys:
        return set()
    rows = session.execute(
        text(
            "SELECT v.resource_type, v.id, v.version_id FROM fhir_resource_version AS v "
            "JOIN unnest(CAST(:types AS text[]), CAST(:ids AS text[]), CAST(:versions AS int[]))"
            " AS k(resource_type, id, version_id) USING (resource_type, id, version_id)"
            " WHERE v.deleted IS false"
        ),
        {
            "types": [key[0] for key in keys],
            "ids": [key[1] for key in keys],
            "versions": [key[2] for key in keys],
        },
    )
    return {(row.resource_type, row.id, row.version_id) for row in rows}


@functools.cache
def _token_lookup(criteria_count: int) -> TextClause:
    conditions = " AND ".join(f"tokens && CAST(:keys{n} AS text[])" for n in range(criteria_count))
    # Only bound-parameter names are interpolated; every value is a parameter.
    return text(
        "SELECT id FROM fhir_resource WHERE resource_type = :resource_type "  # noqa: S608
        f"AND deleted IS false AND {conditions} LIMIT :limit"
    )


def list_ids_by_tokens(
    session: Session, resource_type: str, key_groups: Sequence[Sequence[str]], limit: int
) -> list[str]:
    """Return ids of undeleted resources whose tokens meet every group (any key of each)."""
    params: dict[str, Any] = {"resource_type": resource_type, "limit": limit}
    for position, keys in enumerate(key_groups):
        params[f"keys{position}"] = list(keys)
    return list(session.execute(_token_lookup(len(key_groups)), params).scalars())


def get_version(
    session: Session,
    resource_type: str,
    resource_id: str,
    version_id: int,
    *,
    condition: ColumnElement[bool] | None = None,
) -> ResourceVersionRow | None:
    """Return one historical version, if `condition` (over VERSION) lets it be seen."""
    if condition is None:
        return session.get(ResourceVersionRow, (resource_type, resource_id, version_id))
    statement = select(ResourceVersionRow).where(
        ResourceVersionRow.resource_type == resource_type,
        ResourceVersionRow.id == resource_id,
        ResourceVersionRow.version_id == version_id,
        condition,
    )
    return session.execute(statement).scalar_one_or_none()


_RESOURCE_COLUMNS = (
    "resource_type",
    "id",
    "version_id",
    "last_updated",
    "deleted",
    "compartment_key",
    "patient_ids",
    "tokens",
    "refs",
    "author",
    "resource",
)
_RESOURCE_TYPES = (
    "text",
    "text",
    "int4",
    "timestamptz",
    "bool",
    "text",
    "text[]",
    "text[]",
    "text[]",
    "text",
    "jsonb",
)
_VERSION_COLUMNS = (
    "resource_type",
    "id",
    "version_id",
    "last_updated",
    "method",
    "deleted",
    "compartment_key",
    "patient_ids",
    "author",
    "resource",
)
_VERSION_TYPES = (
    "text",
    "text",
    "int4",
    "timestamptz",
    "text",
    "bool",
    "text",
    "text[]",
    "text",
    "jsonb",
)
_OWNER = ("resource_type", "resource_id", "compartment_key", "param")
_OWNER_TYPES = ("text", "text", "text", "text")
_SIDE_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fhir_search_string": (
        (*_OWNER, "value_normalized", "value_exact"),
        (*_OWNER_TYPES, "text", "text"),
    ),
    "fhir_search_date": ((*_OWNER, "low", "high"), (*_OWNER_TYPES, "timestamptz", "timestamptz")),
    "fhir_search_quantity": (
        (*_OWNER, "value", "low", "high", "system", "code"),
        (*_OWNER_TYPES, "numeric", "numeric", "numeric", "text", "text"),
    ),
    "fhir_search_uri": ((*_OWNER, "uri"), (*_OWNER_TYPES, "text")),
}


def write_versions(session: Session, writes: Sequence[VersionWrite]) -> None:
    """Write current rows, history rows and index rows of many versions at once.

    New rows stream in with COPY; only current rows that replace an existing
    version need an upsert.
    """
    if not writes:
        return
    new_current: list[tuple[Any, ...]] = []
    replaced_current: list[dict[str, Any]] = []
    history: list[tuple[Any, ...]] = []
    side_rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in _SIDE_TABLES}
    replaced: list[tuple[str, str]] = []
    for write in writes:
        index = write.index
        patient_ids = sorted(index.patient_ids if index else write.kept_patient_ids)
        compartment_key = patient_ids[0] if patient_ids else None
        if write.resource_type == "Patient":
            compartment_key = write.id
        document = Jsonb(write.resource) if write.resource is not None else None
        current = (
            write.resource_type,
            write.id,
            write.version_id,
            write.last_updated,
            write.deleted,
            compartment_key,
            patient_ids,
            index.tokens if index else [],
            index.references if index else [],
            write.author,
            document,
        )
        if write.replaces_existing:
            replaced.append((write.resource_type, write.id))
            # SQLAlchemy serializes JSONB itself: give it the document, not the COPY wrapper.
            row: dict[str, Any] = dict(zip(_RESOURCE_COLUMNS, current, strict=True))
            row["resource"] = write.resource
            replaced_current.append(row)
        else:
            new_current.append(current)
        history.append(
            (
                write.resource_type,
                write.id,
                write.version_id,
                write.last_updated,
                write.method,
                write.deleted,
                compartment_key,
                patient_ids,
                write.author,
                document,
            )
        )
        if index is None:
            continue
        owner = (write.resource_type, write.id, compartment_key)
        seen_strings: set[tuple[str, str]] = set()
        for param, normalized, exact in index.strings:
            if (param, normalized) not in seen_strings:
                seen_strings.add((param, normalized))
                side_rows["fhir_search_string"].append((*owner, param, normalized, exact))
        for param, low, high in index.dates:
            side_rows["fhir_search_date"].append((*owner, param, low, high))
        for param, value, low_q, high_q, system, code in index.quantities:
            side_rows["fhir_search_quantity"].append(
                (*owner, param, value, low_q, high_q, system, code)
            )
        for param, uri in dict.fromkeys(index.uris):
            side_rows["fhir_search_uri"].append((*owner, param, uri))

    if replaced:
        for table in SIDE_TABLES:
            session.execute(
                delete(table).where(tuple_(table.resource_type, table.resource_id).in_(replaced))
            )
        upsert = pg_insert(ResourceRow)
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=[ResourceRow.resource_type, ResourceRow.id],
                set_={column: getattr(upsert.excluded, column) for column in _RESOURCE_COLUMNS[2:]},
            ),
            replaced_current,
        )
    copy_rows(session, "fhir_resource", _RESOURCE_COLUMNS, _RESOURCE_TYPES, new_current)
    copy_rows(session, "fhir_resource_version", _VERSION_COLUMNS, _VERSION_TYPES, history)
    for name, (columns, types) in _SIDE_TABLES.items():
        if side_rows[name]:
            copy_rows(session, name, columns, types, side_rows[name])


def list_history(
    session: Session,
    *,
    resource_type: str | None,
    resource_id: str | None,
    since: datetime | None,
    before: Any,
    limit: int,
    condition: Callable[[FromClause], ColumnElement[bool] | None] | None = None,
) -> list[ResourceVersionRow]:
    """Return versions newest first, from a keyset cursor (last_updated, type, id, vid).

    `condition` (the caller's row scope) is checked on each version and on its
    resource's current row: a version naming a patient the caller may not see
    stays hidden after the resource moved to another.
    """
    statement = select(ResourceVersionRow)
    visible = condition(CURRENT) if condition is not None else None
    visible_version = condition(VERSION) if condition is not None else None
    if visible_version is not None:
        statement = statement.where(visible_version)
    if visible is not None:
        statement = statement.where(
            exists(
                select(CURRENT.c.id).where(
                    CURRENT.c.resource_type == ResourceVersionRow.resource_type,
                    CURRENT.c.id == ResourceVersionRow.id,
                    visible,
                )
            )
        )
    if resource_type is not None:
        statement = statement.where(ResourceVersionRow.resource_type == resource_type)
    if resource_id is not None:
        statement = statement.where(ResourceVersionRow.id == resource_id)
    if since is not None:
        statement = statement.where(ResourceVersionRow.last_updated >= since)
    if before is not None:
        statement = statement.where(
            tuple_(
                ResourceVersionRow.last_updated,
                ResourceVersionRow.resource_type,
                ResourceVersionRow.id,
                ResourceVersionRow.version_id,
            )
            < tuple_(*before)
        )
    statement = statement.order_by(
        ResourceVersionRow.last_updated.desc(),
        ResourceVersionRow.resource_type.desc(),
        ResourceVersionRow.id.desc(),
        ResourceVersionRow.version_id.desc(),
    ).limit(limit)
    return list(session.execute(statement).scalars())


def count_history(
    session: Session,
    *,
    resource_type: str | None,
    resource_id: str | None,
    since: datetime | None,
    condition: ColumnElement[bool] | None = None,
) -> int:
    """Count the versions in a history view that `condition` (over VERSION) lets be seen."""
    statement = select(func.count()).select_from(ResourceVersionRow)
    if condition is not None:
        statement = statement.where(condition)
    if resource_type is not None:
        statement = statement.where(ResourceVersionRow.resource_type == resource_type)
    if resource_id is not None:
        statement = statement.where(ResourceVersionRow.id == resource_id)
    if since is not None:
        statement = statement.where(ResourceVersionRow.last_updated >= since)
    return int(session.execute(statement).scalar_one())


def list_compartment(
    session: Session,
    *,
    patient_id: str,
    types: Sequence[str] | None,
    since: datetime | None,
    after: tuple[str, str] | None,
    limit: int,
    condition: Callable[[FromClause], ColumnElement[bool] | None] | None = None,
) -> list[tuple[str, str, str]]:
    """Return a page of a patient's compartment plus the resources it references.

    `condition` (the caller's row scope) applies to both parts.

    Ordered by (type, id) so that keyset paging is stable while new resources arrive.
    """
    compartment = select(
        ResourceRow.resource_type, ResourceRow.id, ResourceRow.resource, ResourceRow.last_updated
    ).where(
        ResourceRow.deleted.is_(False),
        or_(
            ResourceRow.patient_ids.contains([patient_id]),
            and_(ResourceRow.resource_type == "Patient", ResourceRow.id == patient_id),
        ),
    )
    referenced_keys = (
        select(
            func.split_part(literal_column("ref_target"), "/", 1).label("rt"),
            func.split_part(literal_column("ref_target"), "/", 2).label("rid"),
        )
        .select_from(
            select(func.split_part(func.unnest(ResourceRow.refs), "=", 2).label("ref_target"))
            .where(ResourceRow.deleted.is_(False), ResourceRow.patient_ids.contains([patient_id]))
            .subquery()
        )
        .distinct()
        .subquery()
    )
    referenced = select(
        ResourceRow.resource_type, ResourceRow.id, ResourceRow.resource, ResourceRow.last_updated
    ).where(
        ResourceRow.deleted.is_(False),
        ResourceRow.compartment_key.is_(None),
        tuple_(ResourceRow.resource_type, ResourceRow.id).in_(
            select(referenced_keys.c.rt, referenced_keys.c.rid)
        ),
    )
    visible = condition(RESOURCE) if condition is not None else None
    if visible is not None:
        compartment = compartment.where(visible)
        referenced = referenced.where(visible)
    # Disjoint by construction (compartment rows have a compartment key, the
    # referenced ones none), so UNION ALL: no dedupe over whole documents.
    union = compartment.union_all(referenced).subquery()
    # The document as text: the response embeds it as is instead of decoding
    # and re-encoding every resource of a record.
    statement = select(union.c.resource_type, union.c.id, cast(union.c.resource, Text))
    if types:
        statement = statement.where(union.c.resource_type.in_(list(types)))
    if since is not None:
        statement = statement.where(union.c.last_updated >= since)
    if after is not None:
        statement = statement.where(tuple_(union.c.resource_type, union.c.id) > tuple_(*after))
    statement = statement.order_by(union.c.resource_type, union.c.id).limit(limit)
    return [(str(row[0]), str(row[1]), str(row[2])) for row in session.execute(statement)]


_GET_RECEIPT = text(
    "SELECT content_sha256, status, response FROM fhir_bundle_receipt "
    "WHERE client_id = :client_id AND bundle_identifier = :bundle_identifier"
)
_ADD_RECEIPT = text(
    "INSERT INTO fhir_bundle_receipt (client_id, bundle_identifier, content_sha256, status, "
    "response) VALUES (:client_id, :bundle_identifier, :content_sha256, :status, "
    "CAST(:response AS jsonb))"
)


def get_receipt(
    session: Session, client_id: str, bundle_identifier: str
) -> Row[tuple[bytes, int, dict[str, Any]]] | None:
    """Return (content hash, status, response) stored for a bundle, if any."""
    result = session.execute(
        _GET_RECEIPT, {"client_id": client_id, "bundle_identifier": bundle_identifier}
    )
    return result.one_or_none()


def add_receipt(
    session: Session,
    *,
    client_id: str,
    bundle_identifier: str,
    content_sha256: bytes,
    status: int,
    response: dict[str, Any],
) -> None:
    """Store the answer to a bundle under its idempotency key."""
    session.execute(
        _ADD_RECEIPT,
        {
            "client_id": client_id,
            "bundle_identifier": bundle_identifier,
            "content_sha256": content_sha256,
            "status": status,
            "response": orjson.dumps(response).decode(),
        },
    )


_ADD_CARE_RELATIONSHIPS = text(
    "INSERT INTO care_relationship (grantee, patient_id) "
    "SELECT g, p FROM unnest(CAST(:grantees AS text[]), CAST(:patients AS text[])) AS x(g, p) "
    "ON CONFLICT DO NOTHING"
)


def add_care_relationships(session: Session, pairs: Iterable[tuple[str, str]]) -> None:
    """Record (grantee, patient) care relationships; known ones are left alone."""
    # Sorted, so two writers granting overlapping pairs wait on each other in
    # the same order instead of deadlocking.
    ordered = sorted(set(pairs))
    if ordered:
        session.execute(
            _ADD_CARE_RELATIONSHIPS,
            {"grantees": [g for g, _ in ordered], "patients": [p for _, p in ordered]},
        )


_ORGANIZATION_REGIONS = text(
    "SELECT o.id, i ->> 'value' FROM fhir_resource AS o "
    "LEFT JOIN fhir_resource AS parent ON parent.resource_type = 'Organization' "
    "AND parent.id = split_part(o.resource #>> '{partOf,reference}', '/', 2) "
    "CROSS JOIN LATERAL jsonb_array_elements("
    "coalesce(o.resource -> 'identifier', CAST('[]' AS jsonb)) "
    "|| coalesce(parent.resource -> 'identifier', CAST('[]' AS jsonb))) AS i "
    "WHERE o.resource_type = 'Organization' AND o.id = ANY(CAST(:ids AS text[])) "
    "AND NOT o.deleted AND i ->> 'system' = :system"
)


def list_organization_regions(
    session: Session, organization_ids: Sequence[str], *, region_system: str
) -> dict[str, str]:
    """Return the region code of each Organization: its own region identifier or its parent's."""
    rows = session.execute(
        _ORGANIZATION_REGIONS, {"ids": list(organization_ids), "system": region_system}
    )
    return {str(row[0]): str(row[1]) for row in rows}


def list_hidden(
    session: Session, keys: Sequence[tuple[str, str]], condition: ColumnElement[bool]
) -> set[tuple[str, str]]:
    """Return which of these existing resources fail the caller's row condition."""
    if not keys:
        return set()
    statement = select(RESOURCE.c.resource_type, RESOURCE.c.id).where(
        tuple_(RESOURCE.c.resource_type, RESOURCE.c.id).in_(list(keys)), ~condition
    )
    return {(str(row[0]), str(row[1])) for row in session.execute(statement)}


def list_shared(session: Session, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Return which of these resources exist outside any patient's compartment."""
    if not keys:
        return set()
    statement = select(RESOURCE.c.resource_type, RESOURCE.c.id).where(
        tuple_(RESOURCE.c.resource_type, RESOURCE.c.id).in_(list(keys)),
        RESOURCE.c.deleted.is_(False),
        func.cardinality(RESOURCE.c.patient_ids) == 0,
    )
    return {(str(row[0]), str(row[1])) for row in session.execute(statement)}
