"""Who is calling and on which request; every stored version records its author.

The record store does not know tokens or roles: it asks the caller's
`AccessControl` (built by the auth layer) whether an interaction is allowed
and which rows the caller may see (as SQL over `fhir_resource`). Care
relationships are data the store derives from what units write.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import ColumnElement, FromClause


class AccessControl(Protocol):
    """What the record store asks about the caller (implemented by `auth.policy`)."""

    @property
    def unrestricted(self) -> bool:
        """Whether the caller sees every row (no SQL condition needed)."""

    def check(self, interaction: str, resource_type: str | None) -> None:
        """Raise 403 when the caller may not do this interaction at all."""

    def row_condition(self, resource: FromClause) -> ColumnElement[bool] | None:
        """Return the SQL condition over a `fhir_resource` alias for visible rows."""

    @property
    def restricts_rows(self) -> bool:
        """Whether `row_condition` gives a condition, told without building it."""

    @property
    def scope_key(self) -> Hashable:
        """Return what the row condition's SQL depends on (equal keys: the same SQL)."""

    def scope_parameters(self) -> dict[str, Any]:
        """Return the values of the row condition's named parameters."""

    def patient_condition(
        self, patient_id: ColumnElement[str], ordinal: ColumnElement[int]
    ) -> ColumnElement[bool] | None:
        """Return the SQL condition for patients whose records the caller may see (None: all)."""


class _Unrestricted:
    """The access of Waha's own jobs and of tests that do not test access."""

    unrestricted = True

    def check(self, interaction: str, resource_type: str | None) -> None:
        """Allow everything."""

    def row_condition(self, resource: FromClause) -> ColumnElement[bool] | None:
        """See every row."""
        del resource
        return None

    restricts_rows = False

    scope_key = None

    def scope_parameters(self) -> dict[str, Any]:
        """Need no parameters."""
        return {}

    def patient_condition(
        self, patient_id: ColumnElement[str], ordinal: ColumnElement[int]
    ) -> ColumnElement[bool] | None:
        """See every patient's records."""
        del patient_id, ordinal
        return None


UNRESTRICTED_ACCESS: AccessControl = _Unrestricted()


@dataclass(slots=True)
class AuditNotes:
    """What an interaction touched, for the audit trail written after it."""

    resource_refs: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    interaction: str | None = None

    def touched(self, resource_type: str, resource_id: str, patient_ids: Sequence[str]) -> None:
        """Note one resource and its patients (bounded: the audit is not a copy of the data)."""
        if len(self.resource_refs) < 100:
            self.resource_refs.append(f"{resource_type}/{resource_id}")
        for patient_id in patient_ids:
            if patient_id not in self.patient_ids and len(self.patient_ids) < 100:
                self.patient_ids.append(patient_id)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The caller of one interaction, filled by the API edge from the auth layer."""

    client_id: str
    author: str
    request_id: str
    # The unit (`unit-01`) a unit client writes for: its care relationships grow from it.
    unit: str | None = None
    access: AccessControl = UNRESTRICTED_ACCESS
    audit: AuditNotes | None = None

    @property
    def owner(self) -> str:
        """Return who owns what this caller leaves behind (see `owner_of`)."""
        return owner_of(self.client_id, self.author, self.unit)


def owner_of(client_id: str, author: str, unit: str | None) -> str:
    """Return whose a bundle receipt or an upload is: a unit's client, or the person.

    People share the browser and CLI clients, so for them the client says
    nothing about who sent something: their own name does.
    """
    return client_id if unit else f"user:{author}"


SYSTEM_CONTEXT = RequestContext(client_id="waha-system", author="waha-system", request_id="-")
