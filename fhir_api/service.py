"""Rules of the FHIR record store: interactions, Bundles and replay-safe ingest."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg.errors
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from fhir_api import patches, repository
from fhir_api.context import UNRESTRICTED_ACCESS, RequestContext
from fhir_api.errors import (
    BundleInFlight,
    BundleTooLarge,
    IdempotencyConflict,
    UnparsableBody,
    at,
)
from fhir_api.search_index import compile_all
from fhir_api.validation import JSONObject, r4_resource_types, supported_resource_types
from fhir_api.writes import (
    EntryRequest,
    EntryResult,
    TransactionEngine,
    WriteSettings,
    format_instant,
    lock_keys_for,
)
from hub.errors import Issue, WahaError, operation_outcome

# How a Provenance names a unit or a user that has no resource to reference.
SID_UNIT = "https://waha.health/fhir/sid/unit"
SID_USER = "https://waha.health/fhir/sid/user"
REASON_PHRASES = {
    200: "200 OK",
    201: "201 Created",
    204: "204 No Content",
    304: "304 Not Modified",
    400: "400 Bad Request",
    404: "404 Not Found",
    409: "409 Conflict",
    410: "410 Gone",
    412: "412 Precondition Failed",
    413: "413 Payload Too Large",
    422: "422 Unprocessable Entity",
}


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """How large a Bundle may be and how long a duplicate waits for its twin."""

    max_entries: int
    idempotency_wait_seconds: float


@dataclass(frozen=True, slots=True)
class ParsedUrl:
    """The parts of an interaction URL relative to the FHIR base."""

    resource_type: str | None
    resource_id: str | None
    version_id: str | None
    query: str | None
    operation: str | None


def parse_interaction_url(url: str, *, base_url: str) -> ParsedUrl:
    """Split `Type`, `Type/id`, `Type/id/_history/vid`, `Type?query` and `Type/id/$op`."""
    if url.startswith(base_url + "/"):
        url = url[len(base_url) + 1 :]
    elif "://" in url:
        url = _relative_to_type(url)
    split = urlsplit(url)
    parts = [p for p in split.path.split("/") if p]
    query = split.query if "?" in url else None
    if not parts:
        return ParsedUrl(None, None, None, query, None)
    operation = parts[-1] if parts[-1].startswith("$") else None
    if operation:
        parts = parts[:-1]
    resource_type = parts[0] if parts else None
    resource_id = parts[1] if len(parts) > 1 else None
    version_id = None
    if len(parts) == 4 and parts[2] == "_history":
        version_id = parts[3]
    elif len(parts) > 2:
        raise UnparsableBody(f"{url} is not an interaction URL Waha understands")
    return ParsedUrl(resource_type, resource_id, version_id, query, operation)


def _relative_to_type(url: str) -> str:
    # Published examples (HL7's own) put absolute URLs in request.url; what
    # matters is the part from the resource type on.
    split = urlsplit(url)
    segments = split.path.split("/")
    known = r4_resource_types()
    for position in range(len(segments) - 1, -1, -1):
        if segments[position] in known:
            relative = "/".join(segments[position:])
            return f"{relative}?{split.query}" if split.query else relative
    raise UnparsableBody(f"{url} names no resource type")


def _entry_request(entry: Any, position: int, *, base_url: str) -> EntryRequest:
    path = f"Bundle.entry[{position}]"
    if not isinstance(entry, dict):
        raise at(UnparsableBody("a Bundle entry must be an object"), path)
    request = entry.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        raise at(UnparsableBody("a transaction or batch entry needs request.method"), path)
    url = request.get("url")
    if not isinstance(url, str):
        raise at(UnparsableBody("a transaction or batch entry needs request.url"), path)
    method = request["method"].upper()
    if method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"):
        raise at(UnparsableBody(f"request.method {method} is not supported in a bundle"), path)
    parsed = parse_interaction_url(url, base_url=base_url)
    if parsed.resource_type is None or parsed.operation is not None:
        raise at(UnparsableBody(f"request.url {url!r} is not supported in a bundle"), path)
    resource = entry.get("resource")
    if method in ("POST", "PUT") and not isinstance(resource, dict):
        raise at(UnparsableBody(f"a {method} entry needs a resource"), path)
    if method == "POST" and (parsed.resource_id is not None or parsed.query is not None):
        raise at(UnparsableBody("a POST entry's url must be the resource type alone"), path)
    if method in ("PUT", "DELETE", "PATCH") and parsed.resource_id is None and parsed.query is None:
        raise at(UnparsableBody(f"a {method} entry needs an id or search criteria"), path)
    patch = None
    if method == "PATCH":
        try:
            patch = patches.binary_patch(resource)
        except WahaError as error:
            raise at(error, f"{path}.resource") from None
    full_url = entry.get("fullUrl")
    return EntryRequest(
        method=method,
        resource_type=parsed.resource_type,
        resource_id=parsed.resource_id,
        version_id=parsed.version_id,
        query=parsed.query if parsed.resource_id is None else None,
        resource=resource if method in ("POST", "PUT") else None,
        full_url=full_url if isinstance(full_url, str) else None,
        if_none_exist=request.get("ifNoneExist"),
        if_match=request.get("ifMatch"),
        if_none_match=request.get("ifNoneMatch"),
        path=path,
        patch=patch,
    )


def _response_entry(result: EntryResult, *, base_url: str, representation: bool) -> JSONObject:
    response: JSONObject = {"status": REASON_PHRASES.get(result.status, str(result.status))}
    entry: JSONObject = {}
    if result.resource_type and result.resource_id:
        entry["fullUrl"] = f"{base_url}/{result.resource_type}/{result.resource_id}"
    if result.version_id is not None and result.resource_type and result.resource_id:
        response["etag"] = f'W/"{result.version_id}"'
        if result.status in (200, 201):
            response["location"] = (
                f"{result.resource_type}/{result.resource_id}/_history/{result.version_id}"
            )
    if result.last_updated is not None:
        response["lastModified"] = format_instant(result.last_updated)
    if result.outcome is not None:
        response["outcome"] = result.outcome
    if result.search_bundle is not None:
        entry["resource"] = result.search_bundle
    elif result.resource is not None and (representation or result.is_read):
        entry["resource"] = result.resource
    entry["response"] = response
    return entry


def _bundle_identifier(bundle: JSONObject) -> str | None:
    identifier = bundle.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str):
        return f"{identifier.get('system', '')}|{identifier['value']}"
    return None


def _lock_bundle(session: Session, keys: list[str], wait_seconds: float) -> None:
    # A duplicate of an in-flight bundle blocks on the idempotency key until the
    # first commits or rolls back, then reads its receipt; the timeout bounds it.
    try:
        repository.lock_keys(session, keys, timeout_ms=int(wait_seconds * 1000))
    except OperationalError as error:
        if isinstance(error.orig, psycopg.errors.LockNotAvailable):
            raise BundleInFlight(
                "an identical bundle, or another writing the same resources, is still being"
                " processed; retry"
            ) from None
        raise


def process_bundle(
    session: Session,
    bundle: Any,
    *,
    context: RequestContext,
    settings: WriteSettings,
    limits: BundleLimits,
    representation: bool = False,
) -> tuple[int, JSONObject]:
    """Process a transaction or batch Bundle; replay-safe on Bundle.identifier."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise UnparsableBody("POST to the FHIR base takes a Bundle")
    bundle_type = bundle.get("type")
    if bundle_type not in ("transaction", "batch"):
        raise UnparsableBody(f"Bundle.type must be transaction or batch, not {bundle_type!r}")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise UnparsableBody("Bundle.entry must be a list")
    if len(entries) > limits.max_entries:
        raise BundleTooLarge(f"{len(entries)} entries; the limit is {limits.max_entries}")

    requests: list[EntryRequest] = []
    batch: list[EntryRequest | WahaError] = []
    if bundle_type == "transaction":
        requests = [
            _entry_request(entry, position, base_url=settings.base_url)
            for position, entry in enumerate(entries)
        ]
    else:
        # A batch entry that cannot be read fails alone; the others' locks are
        # all taken up front with the bundle's, in one sorted statement, so
        # two batches sharing resources queue instead of deadlocking.
        for position, entry in enumerate(entries):
            try:
                batch.append(_entry_request(entry, position, base_url=settings.base_url))
            except WahaError as error:
                batch.append(error)
        requests = [request for request in batch if isinstance(request, EntryRequest)]
    identifier = _bundle_identifier(bundle)
    digest = b""
    lock_keys = lock_keys_for(requests)
    if identifier is not None:
        digest = hashlib.sha256(orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS)).digest()
        lock_keys.append(f"bundle:{context.owner}:{identifier}")
    _lock_bundle(session, lock_keys, limits.idempotency_wait_seconds)
    if identifier is not None:
        receipt = repository.get_receipt(session, context.owner, identifier)
        if receipt is not None:
            if receipt.content_sha256 != digest:
                raise IdempotencyConflict(
                    "Bundle.identifier was already used by this client for other content"
                )
            return receipt.status, receipt.response

    if bundle_type == "transaction":
        # Under the bundle's locks, taken above: its patches read what they patch.
        requests = [_as_write(session, r, context=context, settings=settings) for r in requests]
        engine = TransactionEngine(session, context=context, settings=settings)
        results = engine.run(requests, locked=True)
    else:
        results = _run_batch(session, batch, context=context, settings=settings)
        if identifier is not None and any(_transient(result) for result in results):
            # A stored answer is replayed forever: one that says "retry" must
            # not be kept, so the whole batch is retried under its key.
            raise BundleInFlight("another request holds what this batch writes; retry")
    _record_provenance(session, bundle, results, context=context, settings=settings)
    response: JSONObject = {
        "resourceType": "Bundle",
        "type": f"{bundle_type}-response",
        "entry": [
            _response_entry(result, base_url=settings.base_url, representation=representation)
            for result in results
        ],
    }
    if identifier is not None:
        repository.add_receipt(
            session,
            client_id=context.owner,
            bundle_identifier=identifier,
            content_sha256=digest,
            status=200,
            response=response,
        )
    return 200, response


def _as_write(
    session: Session, request: EntryRequest, *, context: RequestContext, settings: WriteSettings
) -> EntryRequest:
    """Return a PATCH entry as the update that writes its result; other entries as they are."""
    if request.method != "PATCH":
        return request
    try:
        return patches.as_update(session, request, context=context, settings=settings)
    except WahaError as error:
        raise at(error, request.path) from None


def _record_provenance(
    session: Session,
    bundle: JSONObject,
    results: Sequence[EntryResult],
    *,
    context: RequestContext,
    settings: WriteSettings,
) -> None:
    """Store one Provenance per ingested bundle: what it wrote, who sent it, which bundle."""
    targets = [
        {"reference": f"{r.resource_type}/{r.resource_id}/_history/{r.version_id}"}
        for r in results
        if r.written and r.resource_type is not None and r.status in (200, 201)
    ]
    if not targets:
        return
    provenance: JSONObject = {
        "resourceType": "Provenance",
        "target": targets,
        "recorded": format_instant(datetime.now(UTC)),
        "agent": [_provenance_agent(session, context)],
    }
    identifier = bundle.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        what = {k: identifier[k] for k in ("system", "value") if identifier.get(k)}
        provenance["entity"] = [{"role": "source", "what": {"identifier": what}}]
    # Waha records the Provenance itself: the caller's scopes (which may not
    # name Provenance) govern what it sent, not this record of it.
    system = replace(context, access=UNRESTRICTED_ACCESS, audit=None)
    TransactionEngine(session, context=system, settings=settings).run(
        [EntryRequest(method="POST", resource_type="Provenance", resource=provenance)]
    )


def _provenance_agent(session: Session, context: RequestContext) -> JSONObject:
    author_type = {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "code": "author",
            }
        ]
    }
    unit = context.unit
    if unit is None:
        return {
            "type": author_type,
            "who": {"identifier": {"system": SID_USER, "value": context.author}},
        }
    # Referenced when registered (referential integrity); named otherwise.
    known = repository.list_existing(session, [("Device", unit), ("Organization", unit)])
    agent: JSONObject = {"type": author_type}
    agent["who"] = (
        {"reference": f"Device/{unit}"}
        if ("Device", unit) in known
        else {"identifier": {"system": SID_UNIT, "value": unit}}
    )
    if ("Organization", unit) in known:
        agent["onBehalfOf"] = {"reference": f"Organization/{unit}"}
    return agent


def _transient(result: EntryResult) -> bool:
    issues = (result.outcome or {}).get("issue") or [{}]
    return result.status == BundleInFlight.status and issues[0].get("code") == "transient"


def _run_batch(
    session: Session,
    batch: Sequence[EntryRequest | WahaError],
    *,
    context: RequestContext,
    settings: WriteSettings,
) -> list[EntryResult]:
    """Run each entry on its own (its locks already held); a failure answers that entry."""
    results: list[EntryResult] = []
    for request in batch:
        try:
            if isinstance(request, WahaError):
                raise request
            try:
                with session.begin_nested():
                    if request.method == "PATCH":
                        request = _as_write(session, request, context=context, settings=settings)
                    engine = TransactionEngine(session, context=context, settings=settings)
                    results.extend(engine.run([request], locked=True))
            except OperationalError as error:
                # A lock this entry waited for past the bound fails it alone.
                if not isinstance(error.orig, psycopg.errors.LockNotAvailable):
                    raise
                raise BundleInFlight(
                    "another request holds what this entry writes; retry"
                ) from None
        except WahaError as error:
            results.append(EntryResult(error.status, outcome=operation_outcome(error.issues)))
    return results


def run_interaction(
    session: Session,
    request: EntryRequest,
    *,
    context: RequestContext,
    settings: WriteSettings,
) -> EntryResult:
    """Run one create, update or delete exactly as a one-entry transaction would."""
    return TransactionEngine(session, context=context, settings=settings).run([request])[0]


def outcome_for(message: str) -> JSONObject:
    """Return an informational OperationOutcome (Prefer: return=OperationOutcome)."""
    return operation_outcome([Issue("informational", message, severity="information")])


def warm_up() -> None:
    """Import every R4B model and compile every index extractor before serving.

    Both are cached per process; doing it at start-up keeps the ~3 s of model
    imports off the first unit's request.
    """
    compile_all()
    supported_resource_types()


def device_status(session: Session, device_id: str) -> str | None:
    """Return a Device's status ("inactive" once deleted), or None when there is no such Device."""
    row = repository.get_current(session, "Device", device_id)
    if row is None:
        return None
    if row.deleted:
        return "inactive"
    status = (row.resource or {}).get("status")
    return status if isinstance(status, str) else None
