"""The write engine: one path for single interactions and Bundle entries.

A transaction is planned whole before anything is written: conditional
criteria and instance targets are locked in one sorted statement (so
concurrent bundles serialize on what they share and never deadlock), targets
are resolved, `urn:uuid` and conditional references rewritten, references
checked, then every version, history row, index row and outbox event is
written in a few multi-row statements.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import parse_qsl

from sqlalchemy.orm import Session

from fhir_api import criteria as criteria_module
from fhir_api import repository
from fhir_api.context import RequestContext
from fhir_api.errors import (
    DanglingReference,
    InvalidResource,
    PreconditionFailed,
    ResourceExists,
    ResourceNotFound,
    UnparsableBody,
    VersionConflict,
    at,
    nest_expression,
)
from fhir_api.scope import search_scope
from fhir_api.search import repository as search_repository
from fhir_api.search_index import IndexValues, extract_index
from fhir_api.search_index.encoding import local_reference, server_path
from fhir_api.search_index.extract import patients_named_indirectly
from fhir_api.validation import JSONObject, check_id, check_resource_type, validate_resource
from hub import outbox
from hub.errors import Issue, WahaError

RESOURCE_CHANGED = "fhir.resource_changed"
WRITE_METHODS = ("DELETE", "POST", "PUT")
WRITE_INTERACTION = {"POST": "create", "PUT": "update", "DELETE": "delete"}

# Rules other domains add to what a resource of a type must satisfy before it
# is stored (the imaging store checks and fills a Media's content from the
# stored Binary). Each runs after references are resolved, may change the
# resource, and raises a WahaError (its Issue paths relative to the resource)
# to refuse the entry.
ResourcePreparer = Callable[[Session, JSONObject, RequestContext], None]
_preparers: dict[str, list[ResourcePreparer]] = {}


def register_preparer(resource_type: str, preparer: ResourcePreparer) -> None:
    """Run `preparer` on every created or updated resource of `resource_type`."""
    if preparer not in _preparers.setdefault(resource_type, []):
        _preparers[resource_type].append(preparer)


def unregister_preparer(resource_type: str, preparer: ResourcePreparer) -> None:
    """Stop running `preparer` (tests)."""
    if preparer in _preparers.get(resource_type, []):
        _preparers[resource_type].remove(preparer)


# Organizations name their region with this identifier (the region's own
# Organization does; a unit's Organization is `partOf` it).
SID_REGION = "https://waha.health/fhir/sid/region"
SERVICE_PROVIDER = "service-provider=Organization/"


@dataclass(slots=True)
class EntryRequest:
    """One interaction, from a URL and headers or from a Bundle entry."""

    method: str
    resource_type: str | None
    resource_id: str | None = None
    version_id: str | None = None
    query: str | None = None
    resource: JSONObject | None = None
    full_url: str | None = None
    if_none_exist: str | None = None
    if_match: str | None = None
    if_none_match: str | None = None
    operation: str | None = None
    path: str = ""
    # The server has just chosen `resource_id` (a random UUID nobody else can
    # know, as for an uploaded Binary): no other writer can target it, so it
    # is neither locked nor looked up as an existing version.
    fresh_id: bool = False
    # A PATCH's parsed JSON Patch (fhir_api.patches), before it becomes a PUT.
    patch: Any = None


@dataclass(slots=True)
class EntryResult:
    """What one interaction did: status, the version it produced, an outcome."""

    status: int
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: int | None = None
    last_updated: datetime | None = None
    resource: JSONObject | None = None
    outcome: JSONObject | None = None
    created: bool = False
    # A new version was stored (not a match, a no-op update or a read).
    written: bool = False
    search_bundle: JSONObject | None = None
    is_read: bool = False


@dataclass(slots=True)
class WriteSettings:
    """What the engine needs from the settings."""

    base_url: str
    enforce_referential_integrity: bool = True
    # The largest resource a write may produce from a smaller request (a patch).
    max_resource_bytes: int = 32 * 1024 * 1024


@dataclass(slots=True)
class _Planned:
    entry: EntryRequest
    position: int
    target_id: str | None = None
    matched_existing: bool = False
    no_op_status: int | None = None
    criteria: list[criteria_module.Criterion] = field(default_factory=list)
    index: IndexValues | None = None


def format_instant(moment: datetime) -> str:
    """Render a timestamp as a FHIR instant."""
    return moment.isoformat().replace("+00:00", "Z")


def parse_version_etag(value: str) -> str:
    """Return the version named by an ETag such as W/"3"."""
    stripped = value.strip()
    if stripped.startswith("W/"):
        stripped = stripped[2:]
    return stripped.strip('"')


def _iter_reference_holders(node: Any, path: str) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Yield (holder, key, FHIRPath) for every Reference.reference and Attachment.url."""
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str):
            yield node, "reference", f"{path}.reference"
        attachment_url = node.get("url")
        if isinstance(attachment_url, str) and attachment_url.startswith("urn:"):
            yield node, "url", f"{path}.url"
        for key, value in node.items():
            if isinstance(value, dict | list):
                yield from _iter_reference_holders(value, f"{path}.{key}")
    elif isinstance(node, list):
        for position, item in enumerate(node):
            yield from _iter_reference_holders(item, f"{path}[{position}]")


def names_a_person(resource_type: str, query: str) -> bool:
    """Tell whether criteria name a Patient by identifiers only (`identifier=system|value`)."""
    if resource_type != "Patient":
        return False
    pairs = parse_qsl(query, keep_blank_values=True)
    return bool(pairs) and all(
        name == "identifier" and _system_and_value(value) for name, value in pairs
    )


def _system_and_value(value: str) -> bool:
    system, bar, code = value.partition("|")
    return bool(bar and system and code) and "," not in value and "|" not in code


def _check_patient_named(resource: JSONObject) -> None:
    """Refuse a resource whose patient is named in a way no record can own.

    Named only by identifier or by a contained Patient, it would belong to no
    patient's record and so be every unit's to read.
    """
    params = patients_named_indirectly(resource)
    if params:
        resource_type = resource["resourceType"]
        message = (
            f"{resource_type} names its patient ({', '.join(params)}) only by identifier or a "
            "contained Patient; reference the Patient (Patient/<id>, a bundle entry, or "
            "Patient?identifier=<system>|<value>) so that the record knows whose it is"
        )
        raise InvalidResource(message, issues=[Issue("business-rule", message, resource_type)])


def care_relationships(
    session: Session, written: Sequence[tuple[str, IndexValues]], *, unit: str | None
) -> set[tuple[str, str]]:
    """Return the (grantee, patient) pairs that writing these resources gives.

    The writing unit gains every patient it wrote into; an Encounter gives
    its serviceProvider unit, and that unit's region, the Encounter's patient.
    """
    providers: dict[str, set[str]] = {}
    for resource_type, index in written:
        if not index.patient_ids:
            continue
        if unit is not None:
            providers.setdefault(unit, set()).update(index.patient_ids)
        if resource_type == "Encounter":
            for reference in index.references:
                if reference.startswith(SERVICE_PROVIDER):
                    organization = reference[len(SERVICE_PROVIDER) :]
                    providers.setdefault(organization, set()).update(index.patient_ids)
    if not providers:
        return set()
    regions = repository.list_organization_regions(
        session, sorted(providers), region_system=SID_REGION
    )
    pairs: set[tuple[str, str]] = set()
    for organization, patients in providers.items():
        region = regions.get(organization)
        for patient_id in patients:
            pairs.add((f"unit:{organization}", patient_id))
            if region is not None:
                pairs.add((f"region:{region}", patient_id))
    return pairs


def lock_keys_for(entries: Sequence[EntryRequest]) -> list[str]:
    """Return the advisory-lock keys a write of these entries must hold."""
    keys: list[str] = []
    for entry in entries:
        if entry.method not in WRITE_METHODS and entry.method != "PATCH":
            continue
        query = entry.if_none_exist if entry.method == "POST" else entry.query
        if query is not None:
            keys.append(f"cond:{entry.resource_type}?{criteria_module.normalized_query(query)}")
        elif entry.resource_id is not None and not entry.fresh_id:
            keys.append(f"res:{entry.resource_type}/{entry.resource_id}")
    return keys


def _without_server_fields(resource: JSONObject) -> JSONObject:
    meta = {
        key: value
        for key, value in (resource.get("meta") or {}).items()
        if key not in ("versionId", "lastUpdated")
    }
    trimmed = {key: value for key, value in resource.items() if key != "meta"}
    if meta:
        trimmed["meta"] = meta
    return trimmed


def _same_content(stored: JSONObject, incoming: JSONObject, resource_id: str) -> bool:
    """Tell whether an update would change nothing but server-owned fields."""
    candidate = {**incoming, "id": resource_id}
    return _without_server_fields(stored) == _without_server_fields(candidate)


class TransactionEngine:
    """Plan and apply a list of interactions as one all-or-nothing unit."""

    def __init__(
        self, session: Session, *, context: RequestContext, settings: WriteSettings
    ) -> None:
        self.session = session
        self.context = context
        self.settings = settings
        self.now = datetime.now(UTC)

    def run(self, entries: Sequence[EntryRequest], *, locked: bool = False) -> list[EntryResult]:
        """Apply every entry in the spec's order; return results in the entries' order.

        `locked` says the caller already holds `lock_keys_for(entries)`.
        """
        planned = [_Planned(entry, position) for position, entry in enumerate(entries)]
        self._validate(planned)
        if not locked:
            repository.lock_keys(self.session, lock_keys_for(entries))
        results: dict[int, EntryResult] = {}
        writes: list[_Planned] = []
        created: list[_Planned] = []
        order = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3, "HEAD": 3}
        for item in sorted(planned, key=lambda p: order.get(p.entry.method, 4)):
            if item.entry.method in WRITE_METHODS:
                self._guard(item, lambda it=item: self._resolve_target(it, created))
                if item.no_op_status is None and not item.matched_existing:
                    writes.append(item)
                    if item.entry.method != "DELETE":
                        created.append(item)
        self._check_duplicate_targets(writes)
        self._check_visible_targets(writes)
        self._rewrite_references(planned, created)
        self._prepare(writes)
        results.update(self._apply_writes(writes))
        for item in planned:
            if item.matched_existing or item.no_op_status is not None:
                results[item.position] = self._matched_result(item)
        reads = [item for item in planned if item.entry.method in ("GET", "HEAD")]
        for item in reads:
            results[item.position] = self._guard(item, lambda it=item: self._read(it))
        return [results[position] for position in range(len(planned))]

    def _guard(self, item: _Planned, action: Any) -> Any:
        try:
            return action()
        except WahaError as error:
            self._fail(item, error)

    @staticmethod
    def _fail(item: _Planned, error: WahaError) -> NoReturn:
        """Raise `error` placed under the entry's Bundle path, if it has one."""
        raise (at(error, item.entry.path) if item.entry.path else error) from None

    def _validate(self, planned: Sequence[_Planned]) -> None:
        issues: list[Issue] = []
        first: WahaError | None = None
        for item in planned:
            entry = item.entry
            try:
                if entry.method in WRITE_INTERACTION:
                    # A PUT of an id the server just chose makes a resource: a create.
                    interaction = "create" if entry.fresh_id else WRITE_INTERACTION[entry.method]
                    self.context.access.check(interaction, entry.resource_type)
                if entry.resource_type is not None:
                    check_resource_type(entry.resource_type)
                if entry.resource_id is not None:
                    check_id(entry.resource_id)
                if entry.method in ("POST", "PUT"):
                    if entry.resource is None:
                        raise UnparsableBody(f"{entry.method} needs a resource")
                    validate_resource(entry.resource, expected_type=entry.resource_type)
                    body_id = entry.resource.get("id")
                    if entry.method == "PUT" and entry.resource_id is not None:
                        if body_id is None:
                            raise InvalidResource(
                                "an update must carry the resource's id",
                                issues=[Issue("required", "id is missing", "id")],
                            )
                        if body_id != entry.resource_id:
                            raise InvalidResource(
                                f"the body's id {body_id!r} differs from the URL's",
                                issues=[Issue("invalid", "id differs from the URL", "id")],
                            )
            except WahaError as error:
                error = at(error, entry.path) if entry.path else error
                first = first or error
                issues.extend(error.issues)
        if first is not None:
            first.issues = issues[:100]
            raise first

    def _search(
        self, resource_type: str, query: str, created: Sequence[_Planned]
    ) -> tuple[list[str], list[criteria_module.Criterion]]:
        criteria = criteria_module.parse_criteria(
            resource_type, query, base_url=self.settings.base_url
        )
        if names_a_person(resource_type, query):
            # One record per person (DESIGN.md): a Patient named by identifier is
            # matched whichever unit made it. The unit profile's If-None-Exist
            # takes this path.
            found = repository.list_ids_by_tokens(
                self.session, resource_type, [c.keys for c in criteria], limit=2
            )
        else:
            # Any other criteria match only what the caller may see: a hidden
            # match must neither answer, nor count, nor open a record.
            found = search_repository.list_ids(
                self.session,
                resource_type,
                [c.search for c in criteria],
                limit=2,
                scope=search_scope(self.context.access),
            )
        for other in created:
            if other.entry.resource_type != resource_type or other.target_id is None:
                continue
            if other.index is None and other.entry.resource is not None:
                other.index = extract_index(other.entry.resource)
            if other.index is not None and criteria_module.matches(
                criteria, other.target_id, other.index
            ):
                found.append(other.target_id)
        return list(dict.fromkeys(found)), criteria

    def _resolve_target(self, item: _Planned, created: Sequence[_Planned]) -> None:
        entry = item.entry
        assert entry.resource_type is not None  # noqa: S101 - guaranteed by the parser
        if entry.method == "POST":
            if entry.if_none_exist:
                found, _ = self._search(entry.resource_type, entry.if_none_exist, created)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"If-None-Exist matched {len(found)} {entry.resource_type} resources"
                    )
                if found:
                    item.target_id = found[0]
                    item.matched_existing = True
                    return
            item.target_id = str(uuid.uuid4())
        elif entry.method == "PUT":
            if entry.query is not None:
                found, _ = self._search(entry.resource_type, entry.query, created)
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"conditional update matched {len(found)} {entry.resource_type} resources"
                    )
                body_id = (entry.resource or {}).get("id")
                if found:
                    if body_id is not None and body_id != found[0]:
                        raise InvalidResource("the body's id differs from the matched resource")
                    item.target_id = found[0]
                    self._lock_target(entry.resource_type, found[0])
                else:
                    item.target_id = body_id or str(uuid.uuid4())
            else:
                item.target_id = entry.resource_id
        else:  # DELETE
            if entry.query is not None:
                found, _ = self._search(entry.resource_type, entry.query, ())
                if len(found) > 1:
                    raise PreconditionFailed(
                        f"conditional delete matched {len(found)} {entry.resource_type} resources"
                    )
                if not found:
                    item.no_op_status = 204
                    return
                item.target_id = found[0]
                self._lock_target(entry.resource_type, found[0])
            else:
                item.target_id = entry.resource_id

    def _lock_target(self, resource_type: str, resource_id: str) -> None:
        # A conditional write has locked its criteria; the resource they found
        # takes the lock its writers by id take too, or a patch or update by id
        # could write the same next version at once.
        repository.lock_keys(self.session, [f"res:{resource_type}/{resource_id}"])

    def _check_duplicate_targets(self, writes: Sequence[_Planned]) -> None:
        seen: set[tuple[str | None, str | None]] = set()
        for item in writes:
            key = (item.entry.resource_type, item.target_id)
            if key in seen:
                raise at(
                    InvalidResource(
                        f"the transaction writes {key[0]}/{key[1]} twice",
                        issues=[Issue("duplicate", f"{key[0]}/{key[1]} appears twice")],
                    ),
                    item.entry.path or "Bundle",
                )
            seen.add(key)

    def _rewrite_references(self, planned: Sequence[_Planned], created: Sequence[_Planned]) -> None:
        mapping: dict[str, str] = {}
        bundle_targets: set[tuple[str, str]] = set()
        deleted: set[tuple[str, str]] = set()
        for item in planned:
            entry = item.entry
            if item.target_id is None or entry.resource_type is None:
                continue
            target = f"{entry.resource_type}/{item.target_id}"
            if entry.method == "DELETE":
                deleted.add((entry.resource_type, item.target_id))
                continue
            bundle_targets.add((entry.resource_type, item.target_id))
            if entry.full_url:
                mapping[entry.full_url] = target
                if (
                    entry.method == "POST"
                    and "/" in entry.full_url
                    and not entry.full_url.startswith("urn:")
                ):
                    # An absolute fullUrl's relative form names the entry too (R4 3.3.1).
                    parts = entry.full_url.rstrip("/").split("/")
                    if len(parts) >= 2 and parts[-2] == entry.resource_type:
                        mapping[f"{parts[-2]}/{parts[-1]}"] = target

        base = self.settings.base_url + "/"
        missing: dict[tuple[str, str], list[str]] = {}
        # Of the missing: those referenced as they are now, and versions referenced.
        current: set[tuple[str, str]] = set()
        versions: set[tuple[str, str, int]] = set()
        # Targets found by conditional references: matched whoever's record it
        # is, since one record per person is how care relationships start.
        matched: set[tuple[str, str]] = set()
        for item in planned:
            entry = item.entry
            if entry.method not in ("POST", "PUT") or entry.resource is None:
                continue
            if item.matched_existing:
                continue
            root = entry.resource["resourceType"]
            for holder, key, path in _iter_reference_holders(entry.resource, root):
                value = holder[key]
                where = nest_expression(path, entry.path) if entry.path else path
                if value in mapping:
                    holder[key] = mapping[value]
                    value = holder[key]
                elif value.startswith("urn:uuid:") or value.startswith("urn:oid:"):
                    if key == "url":
                        continue
                    raise DanglingReference(
                        f"{where} names {value}, which is no entry of this bundle",
                        issues=[Issue("not-found", f"unresolved {value}", where)],
                    )
                elif key == "reference" and "?" in value and not value.startswith("http"):
                    holder[key] = value = self._resolve_conditional_reference(value, where, created)
                    matched.add((value.split("/")[0], value.split("/")[1]))
                if key != "reference" or value.startswith("#"):
                    continue
                # This server's own absolute URL is stored as the relative
                # reference it means, so that compartment, access, care
                # relationships and includes see the patient it names.
                localized = local_reference(value, self.settings.base_url)
                if localized is not None:
                    # Spelled otherwise than an entry's absolute fullUrl, it still names it.
                    holder[key] = value = mapping.get(localized, localized)
                elif server_path(value, self.settings.base_url) is not None:
                    raise DanglingReference(
                        f"{where} names this server but no resource (use Type/id)",
                        issues=[Issue("not-found", "not a resource URL of this server", where)],
                    )
                local = value[len(base) :] if value.startswith(base) else value
                parts = local.split("/")
                if len(parts) in (2, 4) and "://" not in local:
                    target_key = (parts[0], parts[1])
                    if target_key in deleted:
                        raise DanglingReference(
                            f"{where} names {local}, which this bundle deletes",
                            issues=[Issue("not-found", f"{local} is deleted here", where)],
                        )
                    if target_key not in bundle_targets:
                        missing.setdefault(target_key, []).append(where)
                        if len(parts) == 4 and parts[2] == "_history":
                            # A version no row can have (not a small number) is absent.
                            number = parts[3]
                            valid = number.isascii() and number.isdigit() and len(number) <= 9
                            versions.add((*target_key, int(number) if valid else -1))
                        else:
                            current.add(target_key)
        if not missing:
            return
        # A reference to a record the caller may not see counts as absent:
        # writing into a stranger's compartment must not open it.
        condition = self.context.access.row_condition(repository.RESOURCE)
        hidden: set[tuple[str, str]] = set()
        if condition is not None:
            candidates = [key for key in missing if key not in matched]
            hidden = repository.list_hidden(self.session, candidates, condition)
        existing: set[tuple[str, str]] | None = None
        if self.settings.enforce_referential_integrity:
            live = repository.list_existing(self.session, sorted(current))
            # A reference to a version needs that version, not a live resource:
            # a batch's Provenance names the update of what a later entry deleted.
            stored = repository.list_existing_versions(self.session, sorted(versions))
            existing = {
                key
                for key in missing
                if (key not in current or key in live)
                and all(version in stored for version in versions if version[:2] == key)
            }
        dangling = [
            (key, paths)
            for key, paths in missing.items()
            if key in hidden or (existing is not None and key not in existing)
        ]
        if dangling:
            issues = [
                Issue("not-found", f"{key[0]}/{key[1]} does not exist", path)
                for key, paths in dangling
                for path in paths
            ]
            raise DanglingReference(
                f"{issues[0].expression} names {dangling[0][0][0]}/{dangling[0][0][1]}, "
                "which does not exist",
                issues=issues[:100],
            )

    def _resolve_conditional_reference(
        self, value: str, where: str, created: Sequence[_Planned]
    ) -> str:
        resource_type, _, query = value.partition("?")
        try:
            check_resource_type(resource_type)
            found, _ = self._search(resource_type, query, created)
        except WahaError as error:
            raise at(error, where) from None
        if len(found) != 1:
            # The query itself stays out of the message: it may carry patient data.
            message = f"conditional reference {resource_type}?… matched {len(found)} resources"
            raise PreconditionFailed(
                f"{where}: {message}",
                issues=[Issue("not-found" if not found else "multiple-matches", message, where)],
            )
        return f"{resource_type}/{found[0]}"

    def _apply_writes(self, writes: Sequence[_Planned]) -> dict[int, EntryResult]:
        keys: list[tuple[str, str]] = [
            (item.entry.resource_type, item.target_id)
            for item in writes
            if item.entry.method != "POST"
            and not item.entry.fresh_id
            and item.entry.resource_type is not None
            and item.target_id is not None
        ]
        current = repository.list_current_versions(self.session, keys)
        # A PUT of unchanged content writes no version (R4 permits it), so a
        # unit's retried update or a reloaded reference set leaves history alone.
        updated_keys = [
            (item.entry.resource_type, item.target_id)
            for item in writes
            if item.entry.method == "PUT"
            and item.entry.resource_type is not None
            and item.target_id is not None
            and (item.entry.resource_type, item.target_id) in current
            and not current[(item.entry.resource_type, item.target_id)][1]
        ]
        stored = repository.list_current_documents(self.session, updated_keys)
        version_writes: list[repository.VersionWrite] = []
        events: list[dict[str, Any]] = []
        results: dict[int, EntryResult] = {}
        for item in writes:
            entry = item.entry
            resource_type = entry.resource_type
            target_id = item.target_id
            assert resource_type is not None and target_id is not None  # noqa: S101
            existing = current.get((resource_type, target_id))
            self._guard(item, lambda e=entry, x=existing: self._check_preconditions(e, x))
            if entry.method == "DELETE":
                if existing is None:
                    self._fail(
                        item, ResourceNotFound(f"{resource_type}/{target_id} does not exist")
                    )
                if existing[1]:
                    results[item.position] = EntryResult(204, resource_type, target_id, existing[0])
                    continue
            unchanged = stored.get((resource_type, target_id))
            if (
                entry.method == "PUT"
                and unchanged is not None
                and entry.resource is not None
                and _same_content(unchanged[1], entry.resource, target_id)
            ):
                results[item.position] = EntryResult(
                    200,
                    resource_type,
                    target_id,
                    existing[0] if existing else 1,
                    unchanged[0],
                    unchanged[1],
                )
                continue
            version = existing[0] + 1 if existing else 1
            resource: JSONObject | None = None
            index: IndexValues | None = None
            if entry.method != "DELETE":
                resource = entry.resource
                assert resource is not None  # noqa: S101
                resource["id"] = target_id
                meta = dict(resource.get("meta") or {})
                meta["versionId"] = str(version)
                meta["lastUpdated"] = format_instant(self.now)
                resource["meta"] = meta
                index = extract_index(resource)
                if not index.patient_ids and self.context.access.restricts_rows:
                    self._guard(item, lambda r=resource: _check_patient_named(r))
            action = "delete" if entry.method == "DELETE" else ("update" if existing else "create")
            version_writes.append(
                repository.VersionWrite(
                    resource_type=resource_type,
                    id=target_id,
                    version_id=version,
                    last_updated=self.now,
                    method=entry.method,
                    deleted=entry.method == "DELETE",
                    author=self.context.author,
                    resource=resource,
                    index=index,
                    replaces_existing=existing is not None,
                    kept_patient_ids=existing.patient_ids
                    if existing is not None and entry.method == "DELETE"
                    else (),
                )
            )
            events.append(
                {"type": resource_type, "id": target_id, "version": version, "action": action}
            )
            results[item.position] = EntryResult(
                status=204
                if entry.method == "DELETE"
                else (200 if existing and not existing[1] else 201),
                resource_type=resource_type,
                resource_id=target_id,
                version_id=version,
                last_updated=self.now,
                resource=resource,
                created=existing is None or existing[1],
                written=True,
            )
        repository.write_versions(self.session, version_writes)
        self._record_care_relationships(version_writes)
        outbox.add_events(
            self.session, RESOURCE_CHANGED, events, request_id=self.context.request_id
        )
        return results

    def _prepare(self, writes: Sequence[_Planned]) -> None:
        # A Binary's bytes are stored before any Media or DocumentReference citing it is checked.
        for item in sorted(writes, key=lambda planned: planned.entry.resource_type != "Binary"):
            entry = item.entry
            if entry.method == "DELETE" or entry.resource is None or entry.resource_type is None:
                continue
            if entry.resource_type not in _preparers:
                continue
            # The final id, so that a preparer can record links to the resource
            # (_apply_writes sets the same id again).
            entry.resource["id"] = item.target_id
            for preparer in _preparers[entry.resource_type]:
                resource = entry.resource
                self._guard(item, lambda p=preparer, r=resource: p(self.session, r, self.context))

    def _check_visible_targets(self, writes: Sequence[_Planned]) -> None:
        """Answer 404 for an update or delete of a resource the caller may not see."""
        condition = self.context.access.row_condition(repository.RESOURCE)
        if condition is None:
            return
        targets = [
            (item.entry.resource_type, item.target_id)
            for item in writes
            if item.entry.method != "POST"
            and item.entry.resource_type is not None
            and item.target_id is not None
        ]
        hidden = repository.list_hidden(self.session, targets, condition)
        for resource_type, _ in repository.list_shared(self.session, targets):
            self.context.access.check("change-shared", resource_type)
        for item in writes:
            key = (item.entry.resource_type, item.target_id)
            if key in hidden:
                # A conditional write must not learn the id its criteria found.
                message = (
                    f"no {key[0]} you may see matches the criteria"
                    if item.entry.query is not None
                    else f"{key[0]}/{key[1]} is not known"
                )
                self._fail(item, ResourceNotFound(message))

    def _record_care_relationships(self, version_writes: Sequence[repository.VersionWrite]) -> None:
        """Grow care relationships from what was written (DESIGN.md "Access rules").

        The writing unit gains every patient it wrote into; an Encounter gives
        its serviceProvider unit, and that unit's region, the Encounter's patient.
        """
        audit = self.context.audit
        written: list[tuple[str, IndexValues]] = []
        for write in version_writes:
            if write.index is None:
                continue
            if audit is not None:
                audit.touched(write.resource_type, write.id, write.index.patient_ids)
            written.append((write.resource_type, write.index))
        pairs = care_relationships(self.session, written, unit=self.context.unit)
        repository.add_care_relationships(self.session, pairs)

    def _check_preconditions(self, entry: EntryRequest, existing: tuple[int, bool] | None) -> None:
        if entry.if_match is not None:
            wanted = parse_version_etag(entry.if_match)
            if existing is None or existing[1] or str(existing[0]) != wanted:
                have = "absent" if existing is None else f"version {existing[0]}"
                raise VersionConflict(f"If-Match wants version {wanted}; the resource is {have}")
        if entry.if_none_match is not None and existing is not None and not existing[1]:
            wanted = parse_version_etag(entry.if_none_match)
            if wanted == "*" or wanted == str(existing[0]):
                raise ResourceExists("If-None-Match: the resource exists")

    def _matched_result(self, item: _Planned) -> EntryResult:
        entry = item.entry
        if item.no_op_status is not None:
            return EntryResult(item.no_op_status, entry.resource_type)
        assert entry.resource_type is not None and item.target_id is not None  # noqa: S101
        row = repository.get_current(self.session, entry.resource_type, item.target_id)
        assert row is not None  # noqa: S101 - it was just found under lock
        # A person matched by identifier may be someone else's patient: the
        # match is told (one record per person), the record is not shown.
        condition = self.context.access.row_condition(repository.RESOURCE)
        hidden = condition is not None and bool(
            repository.list_hidden(self.session, [(entry.resource_type, item.target_id)], condition)
        )
        return EntryResult(
            200,
            entry.resource_type,
            item.target_id,
            row.version_id,
            row.last_updated,
            None if hidden else row.resource,
        )

    def _read(self, item: _Planned) -> EntryResult:
        from fhir_api import reads  # noqa: PLC0415 - reads imports this module's types

        result = reads.read_entry(
            self.session,
            item.entry,
            base_url=self.settings.base_url,
            access=self.context.access,
            audit=self.context.audit,
        )
        result.is_read = True
        return result
