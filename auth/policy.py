"""Who may do what, and see which rows: DESIGN.md "Access rules" in one place.

The record store asks an `Access` two things: may this caller do this
interaction on this type at all (403 when not), and which `fhir_resource` rows
it may see (an SQL condition every query carries, so rows outside the caller's
reach are absent from reads, searches, includes, counts and history alike).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Integer,
    Table,
    Text,
    any_,
    bindparam,
    case,
    exists,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY

from auth.errors import Forbidden
from auth.tokens import Principal
from fhir_api.models import CareRelationshipRow

CARE = cast(Table, CareRelationshipRow.__table__).alias("care")
# Names of the row condition's parameters (see `Access.row_condition`).
SCOPE_GRANTEES = "scope_grantees"
SCOPE_TYPES = "scope_types"
# Up to how many patients a caller's are tested as a hash (see `patient_condition`).
HASHED_PATIENTS = 20_000
# How many rows a walk tests by an index probe each before it builds that hash.
PROBED_ROWS = 300

READ_INTERACTIONS = frozenset({"read", "vread", "history", "search", "everything"})
WRITE_INTERACTIONS = frozenset({"create", "update", "delete"})
# The roles that work with clinical records; relays and the ministry never do
# (relays get appointment views, the ministry aggregates, in their own APIs).
# `change-shared`: update or delete reference data every role relies on
# (Organizations, Devices — a unit's revocation is its Device's status —,
# Locations of tour stops); units and specialists may add, not change, them.
CHANGE_SHARED = "change-shared"
ROLE_INTERACTIONS: dict[str, frozenset[str]] = {
    "admin": READ_INTERACTIONS | WRITE_INTERACTIONS | {CHANGE_SHARED},
    "unit": READ_INTERACTIONS | WRITE_INTERACTIONS,
    "coordinator": READ_INTERACTIONS | WRITE_INTERACTIONS | {CHANGE_SHARED},
    "specialist": READ_INTERACTIONS | frozenset({"create", "update"}),
}
# Rows with no patient compartment (Organization, Location, Device…) are shared
# reference data, except these: a Binary follows its own rule (the uploading
# unit, then the patient of the Media citing it), the audit is admin's, and a
# Provenance that names no patient still lists what a unit wrote.
PRIVATE_TYPES = ("Binary", "AuditEvent", "Provenance")
# SMART on FHIR scopes: v2 `user/Observation.rs`, v1 `user/Observation.read`.
SMART_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perms>read|write|\*|[cruds]+)(?:\?.*)?$"
)
SMART_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
INTERACTION_PERMISSION = {
    "read": "r",
    "vread": "r",
    "history": "r",
    "everything": "r",
    "search": "s",
    "create": "c",
    "update": "u",
    "delete": "d",
}


@dataclass(frozen=True, slots=True)
class SmartPermissions:
    """What SMART scopes in a token allow, per resource type (`*` for all)."""

    by_type: dict[str, frozenset[str]]

    def allows(self, permission: str, resource_type: str | None) -> bool:
        """Return whether some scope grants `permission` on the type."""
        for scoped_type in ("*", resource_type):
            if scoped_type is not None and permission in self.by_type.get(scoped_type, ()):
                return True
        return False

    def readable_types(self) -> list[str] | None:
        """Return the types the scopes let the caller read, or None for every type."""
        readable = [t for t, perms in self.by_type.items() if perms & {"r", "s"}]
        return None if "*" in readable else readable


def smart_permissions(scopes: Iterable[str]) -> SmartPermissions | None:
    """Parse SMART resource scopes; None when the token carries none (nothing narrows)."""
    by_type: dict[str, set[str]] = {}
    for scope in scopes:
        match = SMART_SCOPE.match(scope)
        if match is None:
            continue
        perms = match["perms"]
        letters = SMART_V1.get(perms, perms)
        by_type.setdefault(match["type"], set()).update(letters)
    if not by_type:
        return None
    return SmartPermissions({t: frozenset(p) for t, p in by_type.items()})


def grantees_of(principal: Principal) -> tuple[str, ...]:
    """Return the care-relationship grantees a principal's roles and claims give."""
    grantees: list[str] = []
    if principal.has_role("unit"):
        grantees.append(f"unit:{principal.unit or principal.client_id}")
    if principal.has_role("coordinator") and principal.region:
        grantees.append(f"region:{principal.region}")
    if principal.has_role("specialist") and principal.specialty:
        grantees.append(f"specialty:{principal.specialty}")
    return tuple(grantees)


@dataclass(frozen=True, slots=True)
class Access:
    """One caller's rights, built once per request from a validated token."""

    principal: Principal
    interactions: frozenset[str]
    unrestricted: bool
    grantees: tuple[str, ...]
    smart: SmartPermissions | None

    @property
    def client_id(self) -> str:
        """Return the OAuth client the caller came through."""
        return self.principal.client_id

    @property
    def author(self) -> str:
        """Return how stored versions name this caller."""
        return author_of(self.principal)

    @property
    def unit(self) -> str | None:
        """Return the unit a unit client writes for (None for people)."""
        if self.principal.has_role("unit"):
            return self.principal.unit or self.principal.client_id
        return None

    def check(self, interaction: str, resource_type: str | None) -> None:
        """Raise 403 when the caller's role or scopes never allow this interaction."""
        if interaction == CHANGE_SHARED and interaction not in self.interactions:
            raise Forbidden(f"only an administrator or coordinator may change a {resource_type}")
        if interaction not in self.interactions:
            raise Forbidden(f"the caller's role may not {interaction} clinical records")
        if resource_type == "AuditEvent" and not self.unrestricted:
            raise Forbidden("only an administrator may see or touch the audit trail")
        if self.smart is not None:
            permission = INTERACTION_PERMISSION.get(interaction)
            if permission is not None and not self.smart.allows(permission, resource_type):
                what = resource_type or "these resources"
                raise Forbidden(f"the token's scopes do not allow {interaction} on {what}")

    def row_condition(self, resource: FromClause) -> ColumnElement[bool] | None:
        """Return the SQL condition for the rows this caller may see (None: all).

        The caller's grantees and readable types are named parameters, so a
        statement built for one caller serves every caller of the same `scope_key`
        once `scope_parameters()` are passed with it.
        """
        conditions: list[ColumnElement[bool]] = []
        parameters = self.scope_parameters()
        if not self.unrestricted:
            shared = (func.cardinality(resource.c.patient_ids) == 0) & (
                resource.c.resource_type.not_in(PRIVATE_TYPES)
            )
            if self.grantees:
                grantees = bindparam(SCOPE_GRANTEES, parameters[SCOPE_GRANTEES], type_=ARRAY(Text))
                related = exists(
                    select(CARE.c.patient_id).where(
                        CARE.c.grantee == any_(grantees),
                        CARE.c.patient_id == any_(resource.c.patient_ids),
                    )
                )
                conditions.append(or_(shared, related))
            else:
                conditions.append(shared)
        readable = self.smart.readable_types() if self.smart is not None else None
        if readable is not None:
            types = bindparam(SCOPE_TYPES, parameters[SCOPE_TYPES], type_=ARRAY(Text))
            conditions.append(resource.c.resource_type == any_(types) if readable else false())
        if not conditions:
            return None
        return conditions[0] if len(conditions) == 1 else conditions[0] & conditions[1]

    @property
    def restricts_rows(self) -> bool:
        """Whether `row_condition` gives a condition, told without building it."""
        return not self.unrestricted or (
            self.smart is not None and self.smart.readable_types() is not None
        )

    def patient_condition(
        self, patient_id: ColumnElement[str], ordinal: ColumnElement[int]
    ) -> ColumnElement[bool] | None:
        """Return the SQL condition for patients whose records this caller may see (None: all).

        A record with patients is visible when one of them passes, so a search
        can test a patient id carried by an index row before fetching the
        resource (`row_condition` stays the rule). `ordinal` numbers the rows
        in the order they are tested, from 1. Same parameters as `row_condition`.
        """
        if self.unrestricted:
            return None
        if not self.grantees:
            return false()
        grantees = bindparam(SCOPE_GRANTEES, list(self.grantees), type_=ARRAY(Text))
        patients = select(CARE.c.patient_id).where(CARE.c.grantee == any_(grantees))
        # Tested for thousands of rows per search: against a hash of the
        # caller's patients, built once, rather than an index probe per row
        # (15 ms against 6 for a unit's week of encounters). Only for a caller
        # with up to HASHED_PATIENTS of them (counted once per statement): for
        # a region's hundred thousand, building the hash would cost more than
        # the probes it saves. The bound is in the SQL too, so that even a
        # generic plan knows the set fits in memory: PostgreSQL hashes a set
        # only then, and would otherwise scan it for every row.
        cap = literal_column(str(HASHED_PATIENTS), Integer)
        few = not_(exists(patients.offset(cap)))
        hashed = patient_id.in_(patients.limit(cap))
        probe = exists(patients.where(CARE.c.patient_id == patient_id).correlate_except(CARE))
        # A CASE, so that the count is written (and run) once. PostgreSQL builds
        # the hash (and runs the count) only when a row first takes that branch:
        # a walk that fills its page within its first PROBED_ROWS rows (a caller
        # who sees most of them) never pays for either, while one that reads a
        # whole week to find a few rows probes only the first PROBED_ROWS (about
        # the cost of a unit's hash).
        probed = ordinal <= literal_column(str(PROBED_ROWS), Integer)
        return case((probed, probe), (few, hashed), else_=probe)

    @property
    def scope_key(self) -> Hashable:
        """Return what the SQL of `row_condition` depends on; its values are parameters."""
        readable = self.smart.readable_types() if self.smart is not None else None
        types = None if readable is None else bool(readable)
        return (self.unrestricted, bool(self.grantees), types)

    def scope_parameters(self) -> dict[str, Any]:
        """Return the values of the named parameters `row_condition` uses."""
        readable = self.smart.readable_types() if self.smart is not None else None
        return {SCOPE_GRANTEES: list(self.grantees), SCOPE_TYPES: list(readable or ())}


def access_for(principal: Principal) -> Access:
    """Build the access of a validated principal."""
    interactions: set[str] = set()
    for role in principal.roles:
        interactions |= ROLE_INTERACTIONS.get(role, frozenset())
    return Access(
        principal=principal,
        interactions=frozenset(interactions),
        unrestricted=principal.has_role("admin"),
        grantees=grantees_of(principal),
        smart=smart_permissions(principal.scopes),
    )


def author_of(principal: Principal) -> str:
    """Return how stored versions name their author: the unit's Device, or the user."""
    if principal.has_role("unit"):
        return f"Device/{principal.unit or principal.client_id}"
    return principal.username or principal.subject
