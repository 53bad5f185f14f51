"""The FHIR patch interaction with JSON Patch (RFC 6902), as an update of the current version.

R4 (http.html#patch) lets a server take JSON Patch, XML Patch or FHIRPath
Patch; Waha takes JSON Patch (`application/json-patch+json`). The patch is
applied to the current version the caller can read, under the lock every
writer of that resource by id takes, so patches and updates of one resource
queue instead of overwriting each other. The result is written as an update
of exactly the version read (an implicit If-Match): a conditional update,
which locks its query instead, makes it a 412 rather than be overwritten.
"""

from __future__ import annotations

import base64
import binascii
import copy
from typing import Any

import jsonpatch
import jsonpointer
import orjson
from sqlalchemy.orm import Session

from fhir_api import criteria as criteria_module
from fhir_api import reads, repository
from fhir_api.context import RequestContext
from fhir_api.errors import (
    InvalidResource,
    PreconditionFailed,
    ResourceNotFound,
    UnparsableBody,
    VersionConflict,
)
from fhir_api.search import repository as search_repository
from fhir_api.writes import (
    EntryRequest,
    EntryResult,
    TransactionEngine,
    WriteSettings,
    lock_keys_for,
    parse_version_etag,
)
from hub.errors import Issue

JSON_PATCH = "application/json-patch+json"
# Elements the server owns: a patch may not move a resource to another type or id.
_FIXED = ("resourceType", "id")


# The members each operation needs besides `op` and `path` (RFC 6902, section 4).
_MEMBERS = {"add": "value", "replace": "value", "test": "value", "move": "from", "copy": "from"}


def parse_json_patch(body: bytes) -> jsonpatch.JsonPatch:
    """Parse a JSON Patch document, or raise a 400 saying what is wrong with it."""
    try:
        operations = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise UnparsableBody(f"the JSON Patch is not JSON: {error}") from error
    if not isinstance(operations, list) or not operations:
        raise UnparsableBody("a JSON Patch is a non-empty array of operations")
    try:
        patch = jsonpatch.JsonPatch(operations)
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException) as error:
        raise UnparsableBody(f"the JSON Patch is malformed: {error}") from error
    # The library checks these only as it applies each operation: a malformed
    # document is a 400 before anything is read, not a 422 halfway through.
    for number, operation in enumerate(operations):
        member = _MEMBERS.get(operation["op"])
        if member is not None and member not in operation:
            raise UnparsableBody(f"operation {number} ({operation['op']}) has no {member!r}")
    return patch


def apply_json_patch(resource: dict[str, Any], patch: jsonpatch.JsonPatch) -> dict[str, Any]:
    """Return the resource with the patch applied (422 if it cannot be, as a whole)."""
    try:
        patched = patch.apply(copy.deepcopy(resource))
    except jsonpatch.JsonPatchTestFailed as error:
        message = f"the patch's test failed: {error}"
        raise InvalidResource(message, issues=[Issue("processing", message)]) from error
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        message = f"the patch cannot be applied: {error}"
        raise InvalidResource(message, issues=[Issue("processing", message)]) from error
    if not isinstance(patched, dict):
        raise InvalidResource("the patch replaced the resource with something else")
    for element in _FIXED:
        if patched.get(element) != resource.get(element):
            raise InvalidResource(
                f"a patch may not change {element}",
                issues=[Issue("invalid", f"{element} may not change", element)],
            )
    return patched


def patch_target(session: Session, resource_type: str, query: str, *, base_url: str) -> str:
    """Return the id of the one resource a conditional patch's criteria match."""
    criteria = criteria_module.parse_criteria(resource_type, query, base_url=base_url)
    found = search_repository.list_ids(
        session, resource_type, [criterion.search for criterion in criteria], limit=2
    )
    if len(found) > 1:
        raise PreconditionFailed(
            f"conditional patch matched {len(found)} {resource_type} resources"
        )
    if not found:
        raise ResourceNotFound(f"no {resource_type} matches the conditional patch")
    return found[0]


def as_update(
    session: Session, entry: EntryRequest, *, context: RequestContext, base_url: str
) -> EntryRequest:
    """Return the PUT that writes a PATCH entry's result; the caller holds its lock."""
    assert entry.resource_type is not None and entry.patch is not None  # noqa: S101
    resource_type = entry.resource_type
    context.access.check("update", resource_type)
    resource_id = entry.resource_id or patch_target(
        session, resource_type, entry.query or "", base_url=base_url
    )
    current = reads.read_resource(
        session,
        resource_type=resource_type,
        resource_id=resource_id,
        access=context.access,
        audit=context.audit,
    )
    if entry.if_match is not None and parse_version_etag(entry.if_match) != str(current.version_id):
        raise VersionConflict(
            f"{resource_type}/{resource_id} is at version {current.version_id}, "
            f"not {entry.if_match}"
        )
    assert current.resource is not None  # noqa: S101 - a current, undeleted version has a body
    return EntryRequest(
        method="PUT",
        resource_type=resource_type,
        resource_id=resource_id,
        resource=apply_json_patch(current.resource, entry.patch),
        # Still the version read, whatever else writes it (a conditional update
        # locks its query, not this resource).
        if_match=f'W/"{current.version_id}"',
        path=entry.path,
    )


def patch_resource(
    session: Session,
    *,
    resource_type: str,
    resource_id: str,
    patch: jsonpatch.JsonPatch,
    if_match: str | None,
    context: RequestContext,
    settings: WriteSettings,
) -> EntryResult:
    """Apply a JSON Patch to the current version and write the result as its update."""
    entry = EntryRequest(
        method="PATCH",
        resource_type=resource_type,
        resource_id=resource_id,
        if_match=if_match,
        patch=patch,
    )
    # The lock every writer of this resource takes, held from the read to the
    # write: patches of one resource queue instead of overwriting each other.
    repository.lock_keys(session, lock_keys_for([entry]))
    update = as_update(session, entry, context=context, base_url=settings.base_url)
    engine = TransactionEngine(session, context=context, settings=settings)
    return engine.run([update], locked=True)[0]


def binary_json_patch(resource: Any) -> jsonpatch.JsonPatch:
    """Return the JSON Patch a transaction's PATCH entry carries in a Binary (R4 http.html)."""
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        raise UnparsableBody("FHIRPath Patch is not supported: send a Binary with a JSON Patch")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise UnparsableBody("a PATCH entry's resource is a Binary holding a JSON Patch")
    if resource.get("contentType") != JSON_PATCH:
        raise UnparsableBody(f"a PATCH entry's Binary must have contentType {JSON_PATCH}")
    data = resource.get("data")
    try:
        body = base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except binascii.Error:
        body = None
    if not body:
        raise UnparsableBody("a PATCH entry's Binary needs its JSON Patch as base64 data")
    return parse_json_patch(body)
