"""The FHIR patch interaction with JSON Patch (RFC 6902), as an update of the current version.

R4 (http.html#patch) lets a server take JSON Patch, XML Patch or FHIRPath
Patch; Waha takes JSON Patch (`application/json-patch+json`). The patch is
applied to the current version the caller can read, under the lock every
writer of that resource takes (by id, or once its criteria found it), so
patches and updates of one resource queue instead of overwriting each other,
and is written as an update of exactly the version read. A patch may not
grow a resource past the body limit (`copy` can double it per operation).
"""

from __future__ import annotations

import base64
import binascii
import copy
from dataclasses import dataclass
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
    NotPatchable,
    PreconditionFailed,
    ResourceNotFound,
    UnparsableBody,
    VersionConflict,
)
from fhir_api.scope import search_scope
from fhir_api.search import repository as search_repository
from fhir_api.writes import (
    EntryRequest,
    EntryResult,
    TransactionEngine,
    WriteSettings,
    parse_version_etag,
)
from hub.errors import Issue, PayloadTooLarge, UnsupportedMediaType

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
# What a PATCH body may be sent as. Under plain JSON types the body says which:
# an array is a JSON Patch, an object a merge patch (what fhirpy sends).
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, "application/json", "application/fhir+json")
# Binary content lives in object storage and is written once (imaging_store).
NOT_PATCHABLE = frozenset({"Binary"})
# Elements the server owns: a patch may not move a resource to another type or id.
_FIXED = ("resourceType", "id")


# The members each operation needs besides `op` and `path` (RFC 6902, section 4).
_MEMBERS = {"add": "value", "replace": "value", "test": "value", "move": "from", "copy": "from"}
# Bounds the work one patch may ask for; far more than any edit of a resource needs.
MAX_OPERATIONS = 1_000
Operations = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Patch:
    """A parsed patch: JSON Patch operations (RFC 6902) or a merge patch (RFC 7386)."""

    operations: Operations | None = None
    merge: dict[str, Any] | None = None


def _loaded(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise UnparsableBody(f"the patch is not JSON: {error}") from error


def parse_json_patch(body: bytes) -> Operations:
    """Parse a JSON Patch document, or raise a 400 saying what is wrong with it."""
    return _checked_operations(_loaded(body))


def parse_patch(content_type: str, body: bytes) -> Patch:
    """Parse a PATCH body by its media type (one of PATCH_TYPES), or raise a 400 or 415."""
    document = _loaded(body)
    if content_type == JSON_PATCH or (content_type != MERGE_PATCH and isinstance(document, list)):
        return Patch(operations=_checked_operations(document))
    if not isinstance(document, dict):
        raise UnparsableBody("a merge patch is a JSON object")
    if content_type != MERGE_PATCH and document.get("resourceType") == "Parameters":
        error = UnsupportedMediaType(
            f"FHIRPath Patch is not supported: send a JSON Patch ({JSON_PATCH})"
        )
        error.headers["Accept-Patch"] = ", ".join((JSON_PATCH, MERGE_PATCH))
        raise error
    return Patch(merge=document)


def _checked_operations(operations: Any) -> Operations:
    if not isinstance(operations, list):
        raise UnparsableBody("a JSON Patch is an array of operations")
    if len(operations) > MAX_OPERATIONS:
        raise UnparsableBody(f"a JSON Patch takes at most {MAX_OPERATIONS:,} operations")
    try:
        jsonpatch.JsonPatch(operations)
        # The library checks these only as it applies each operation: a malformed
        # document is a 400 before anything is read, not a 422 halfway through.
        for number, operation in enumerate(operations):
            member = _MEMBERS.get(operation["op"])
            if member is not None and member not in operation:
                raise UnparsableBody(f"operation {number} ({operation['op']}) has no {member!r}")
            if member == "from":
                jsonpointer.JsonPointer(operation["from"])
    except (
        jsonpatch.InvalidJsonPatch,
        jsonpointer.JsonPointerException,
        AttributeError,
        TypeError,
    ) as error:
        raise UnparsableBody(f"the JSON Patch is malformed: {error}") from error
    return operations


def merged(target: Any, patch: Any) -> Any:
    """Return `target` with a merge patch applied (RFC 7386, section 2: null removes)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merged(result.get(name), value)
    return result


def apply_patch(resource: dict[str, Any], patch: Patch, *, size_limit: int) -> dict[str, Any]:
    """Return the resource with the patch applied as a whole (422 if it cannot be)."""
    try:
        if patch.operations is not None:
            patched = apply_json_patch(resource, patch.operations, size_limit=size_limit)
        else:
            patched = merged(copy.deepcopy(resource), patch.merge)
    except RecursionError as error:
        raise UnparsableBody("the patch nests too deeply") from error
    if len(orjson.dumps(patched)) > size_limit:
        raise PayloadTooLarge(f"the patched resource would be over the {size_limit}-byte limit")
    for element in _FIXED:
        if patched.get(element) != resource.get(element):
            raise InvalidResource(
                f"a patch may not change {element}",
                issues=[Issue("invalid", f"{element} may not change", element)],
            )
    return patched


def apply_json_patch(
    resource: dict[str, Any], operations: Operations, *, size_limit: int
) -> dict[str, Any]:
    """Return the resource with the patch applied (422 if it cannot be, as a whole)."""
    patched: Any = copy.deepcopy(resource)
    # `copy` is the one operation that grows a resource by more than the patch's
    # own size: repeated, it doubles it each time (17 copies, 25 MB).
    size = len(orjson.dumps(resource))
    try:
        for operation in operations:
            if operation["op"] == "copy":
                copied = jsonpointer.JsonPointer(operation["from"]).resolve(patched)
                size += len(orjson.dumps(copied))
                if size > size_limit:
                    raise PayloadTooLarge(
                        f"the patched resource would be over the {size_limit}-byte limit"
                    )
            patched = jsonpatch.JsonPatch([operation]).apply(patched, in_place=True)
    except jsonpatch.JsonPatchTestFailed as error:
        message = f"the patch's test failed: {error}"
        raise InvalidResource(message, issues=[Issue("processing", message)]) from error
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        message = f"the patch cannot be applied: {error}"
        raise InvalidResource(message, issues=[Issue("processing", message)]) from error
    if not isinstance(patched, dict):
        raise InvalidResource("the patch replaced the resource with something else")
    return patched


def _target(session: Session, entry: EntryRequest, context: RequestContext, base_url: str) -> str:
    """Return the id a PATCH names, or the one its criteria match among what the caller sees."""
    assert entry.resource_type is not None  # noqa: S101 - guaranteed by the parser
    if entry.resource_id is not None:
        return entry.resource_id
    criteria = criteria_module.parse_criteria(
        entry.resource_type, entry.query or "", base_url=base_url
    )
    # Searched within the caller's scope: a patch must not learn what it may not read.
    found = search_repository.list_ids(
        session,
        entry.resource_type,
        [criterion.search for criterion in criteria],
        limit=2,
        scope=search_scope(context.access),
    )
    if len(found) > 1:
        raise PreconditionFailed(
            f"conditional patch matched {len(found)} {entry.resource_type} resources"
        )
    if not found:
        raise ResourceNotFound(f"no {entry.resource_type} you may see matches the criteria")
    return found[0]


def as_update(
    session: Session, entry: EntryRequest, *, context: RequestContext, settings: WriteSettings
) -> EntryRequest:
    """Return the PUT that writes a PATCH entry's result, holding the resource's write lock."""
    assert entry.resource_type is not None and entry.patch is not None  # noqa: S101
    resource_type = entry.resource_type
    context.access.check("update", resource_type)
    if resource_type in NOT_PATCHABLE:
        raise NotPatchable(f"a {resource_type} cannot be patched; upload a new one")
    if entry.version_id is not None:
        raise UnparsableBody("a patch applies to the current version: use If-Match, not _history")
    resource_id = _target(session, entry, context, settings.base_url)
    # The lock every writer of this resource by id takes (a conditional patch
    # has locked only its criteria so far), held from the read to the write:
    # patches and updates of one resource queue instead of overwriting each other.
    repository.lock_keys(session, [f"res:{resource_type}/{resource_id}"])
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
    patch: Patch = entry.patch
    patched = apply_patch(current.resource, patch, size_limit=settings.max_resource_bytes)
    return EntryRequest(
        method="PUT",
        resource_type=resource_type,
        resource_id=resource_id,
        resource=patched,
        full_url=entry.full_url,
        # The version read: a safeguard should any writer not take the lock.
        if_match=f'W/"{current.version_id}"',
        path=entry.path,
    )


def patch_resource(
    session: Session,
    *,
    resource_type: str,
    resource_id: str | None,
    query: str | None,
    patch: Patch,
    if_match: str | None,
    context: RequestContext,
    settings: WriteSettings,
) -> EntryResult:
    """Apply a JSON Patch to the current version and write the result as its update."""
    entry = EntryRequest(
        method="PATCH",
        resource_type=resource_type,
        resource_id=resource_id,
        query=query,
        if_match=if_match,
        patch=patch,
    )
    update = as_update(session, entry, context=context, settings=settings)
    engine = TransactionEngine(session, context=context, settings=settings)
    return engine.run([update], locked=True)[0]


def binary_patch(resource: Any) -> Patch:
    """Return the patch a transaction's PATCH entry carries in a Binary (R4 http.html)."""
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        raise UnparsableBody("FHIRPath Patch is not supported: send a Binary with a JSON Patch")
    if not isinstance(resource, dict) or resource.get("resourceType") != "Binary":
        raise UnparsableBody("a PATCH entry's resource is a Binary holding a JSON Patch")
    content_type = resource.get("contentType")
    media_type = content_type.split(";")[0].strip() if isinstance(content_type, str) else ""
    if media_type not in (JSON_PATCH, MERGE_PATCH):
        raise UnparsableBody(
            f"a PATCH entry's Binary must have contentType {JSON_PATCH} or {MERGE_PATCH}"
        )
    data = resource.get("data")
    try:
        # Line breaks are allowed in base64Binary (MIME-style wrapping).
        body = (
            base64.b64decode("".join(data.split()), validate=True)
            if isinstance(data, str)
            else None
        )
    except binascii.Error:
        body = None
    if body is None:
        raise UnparsableBody("a PATCH entry's Binary needs its patch as base64 data")
    return parse_patch(media_type, body)
