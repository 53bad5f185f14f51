"""Tables of the record store: current versions, history, search index and receipts.

One row per resource carries the token and reference index as text arrays (GIN),
so the common case writes no separate index rows; strings, dates, quantities and
uris, which need range or prefix lookups, live in narrow side tables.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hub.db import Base

# No GIN pending list: every lookup scans the pending list whole, so even a
# 256 kB one (31 pages) made an identifier lookup read 42 pages instead of 11
# and cost 0.13 ms instead of 0.015. Writing each entry straight into the tree
# measured no slower for 8-client bundle ingest (887-922 resources/s against
# 825-924), and no writer pays for merging a full list on someone's behalf.
GIN_STORAGE = {"fastupdate": "off"}


class ResourceRow(Base):
    """The current version of one resource (or its tombstone)."""

    __tablename__ = "fhir_resource"
    __table_args__ = (
        PrimaryKeyConstraint("resource_type", "id"),
        # The type sits in the GIN itself (btree_gin): ANDed with a separate
        # type index, the planner walked every row of the type per lookup.
        Index(
            "ix_fhir_resource_tokens",
            "resource_type",
            "tokens",
            postgresql_using="gin",
            postgresql_with=GIN_STORAGE,
        ),
        # The type sits in the GIN itself (btree_gin): ANDed with a separate
        # type index, the planner walked every row of the type per lookup.
        Index(
            "ix_fhir_resource_refs",
            "resource_type",
            "refs",
            postgresql_using="gin",
            postgresql_with=GIN_STORAGE,
        ),
        Index(
            "ix_fhir_resource_patient_ids",
            "patient_ids",
            postgresql_using="gin",
            postgresql_with=GIN_STORAGE,
        ),
        Index("ix_fhir_resource_type_updated", "resource_type", "last_updated"),
        # The few resources with several patients: an index row names only the
        # first, so a restricted search asks this index whether there are others.
        Index(
            "ix_fhir_resource_several_patients",
            "resource_type",
            "id",
            postgresql_where=text("cardinality(patient_ids) > 1"),
        ),
    )

    resource_type: Mapped[str] = mapped_column(Text)
    id: Mapped[str] = mapped_column(Text)
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The patient compartment key: distribution key on the Citus path (DESIGN.md).
    compartment_key: Mapped[str | None] = mapped_column(Text)
    patient_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    tokens: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    refs: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    author: Mapped[str | None] = mapped_column(Text)
    resource: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class ResourceVersionRow(Base):
    """Every version ever written, deletions included (FHIR history)."""

    __tablename__ = "fhir_resource_version"
    __table_args__ = (
        PrimaryKeyConstraint("resource_type", "id", "version_id"),
        # One time index serves system and type history; each extra index on
        # this append-only table costs every write.
        Index("ix_fhir_resource_version_last_updated", "last_updated"),
    )

    resource_type: Mapped[str] = mapped_column(Text)
    id: Mapped[str] = mapped_column(Text)
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    method: Mapped[str] = mapped_column(Text)
    deleted: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    compartment_key: Mapped[str | None] = mapped_column(Text)
    # The patients this version names (a deletion: those of the version it
    # ends), so that each version is shown only to whoever may see them.
    patient_ids: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'"))
    author: Mapped[str | None] = mapped_column(Text)
    resource: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class SearchStringRow(Base):
    """A string search value (normalized for matching) of one resource."""

    __tablename__ = "fhir_search_string"
    __table_args__ = (
        PrimaryKeyConstraint("resource_type", "resource_id", "param", "value_normalized"),
        # In byte order (C collation), so a prefix LIKE is a range of it, and with
        # the id as a key column: a name search walks (value, id) in order and
        # stops after a page (fhir_api.search.repository.string_key).
        Index(
            "ix_fhir_search_string_walk",
            "resource_type",
            "param",
            text('(value_normalized COLLATE "C")'),
            "resource_id",
        ),
    )

    resource_type: Mapped[str] = mapped_column(Text)
    resource_id: Mapped[str] = mapped_column(Text)
    compartment_key: Mapped[str | None] = mapped_column(Text)
    param: Mapped[str] = mapped_column(Text)
    value_normalized: Mapped[str] = mapped_column(Text)
    value_exact: Mapped[str] = mapped_column(Text)


class SearchDateRow(Base):
    """A date search value of one resource as the closed range it covers."""

    __tablename__ = "fhir_search_date"
    __table_args__ = (
        Index("ix_fhir_search_date_owner", "resource_type", "resource_id"),
        # Date prefixes become one range-overlap test; GiST answers it without
        # scanning every row of a parameter (btree_gist for the text columns).
        Index(
            "ix_fhir_search_date_range",
            "resource_type",
            "param",
            text("tstzrange(least(low, high), greatest(low, high), '[]')"),
            postgresql_using="gist",
        ),
        # In the two sort orders of a date (`date` by period start, `-date` by
        # end) with the id as tie-break: a search sorted by the date it filters
        # on reads a page of one (fhir_api.search.repository._date_walk_page).
        # Filters test the range's bounds as expressions, so that these serve
        # walks only (see repository.ROW_START).
        Index(
            "ix_fhir_search_date_by_start",
            "resource_type",
            "param",
            "low",
            "resource_id",
        ),
        Index(
            "ix_fhir_search_date_by_end",
            "resource_type",
            "param",
            text("high DESC"),
            "resource_id",
        ),
    )

    # No surrogate key: rows are only ever found through the indexes and
    # replaced per resource, so a sequence and a primary-key index are pure cost.
    __mapper_args__ = {"primary_key": ["resource_type", "resource_id", "param", "low", "high"]}

    resource_type: Mapped[str] = mapped_column(Text)
    resource_id: Mapped[str] = mapped_column(Text)
    compartment_key: Mapped[str | None] = mapped_column(Text)
    param: Mapped[str] = mapped_column(Text)
    low: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    high: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SearchQuantityRow(Base):
    """A number or quantity search value of one resource, with its precision range."""

    __tablename__ = "fhir_search_quantity"
    __table_args__ = (
        Index("ix_fhir_search_quantity_owner", "resource_type", "resource_id"),
        Index("ix_fhir_search_quantity_lookup", "resource_type", "param", "value"),
    )

    __mapper_args__ = {"primary_key": ["resource_type", "resource_id", "param", "value"]}

    resource_type: Mapped[str] = mapped_column(Text)
    resource_id: Mapped[str] = mapped_column(Text)
    compartment_key: Mapped[str | None] = mapped_column(Text)
    param: Mapped[str] = mapped_column(Text)
    value: Mapped[Decimal] = mapped_column(Numeric)
    low: Mapped[Decimal] = mapped_column(Numeric)
    high: Mapped[Decimal] = mapped_column(Numeric)
    system: Mapped[str | None] = mapped_column(Text)
    code: Mapped[str | None] = mapped_column(Text)


class SearchUriRow(Base):
    """A uri search value of one resource."""

    __tablename__ = "fhir_search_uri"
    __table_args__ = (
        PrimaryKeyConstraint("resource_type", "resource_id", "param", "uri"),
        Index("ix_fhir_search_uri_lookup", "resource_type", "param", text("uri text_pattern_ops")),
    )

    resource_type: Mapped[str] = mapped_column(Text)
    resource_id: Mapped[str] = mapped_column(Text)
    compartment_key: Mapped[str | None] = mapped_column(Text)
    param: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text)


class BundleReceiptRow(Base):
    """The stored answer to a bundle, keyed by client and Bundle.identifier."""

    __tablename__ = "fhir_bundle_receipt"
    __table_args__ = (PrimaryKeyConstraint("client_id", "bundle_identifier"),)

    client_id: Mapped[str] = mapped_column(Text)
    bundle_identifier: Mapped[str] = mapped_column(Text)
    content_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[int] = mapped_column(SmallInteger)
    response: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )


class CareRelationshipRow(Base):
    """Who may see a patient's record, derived from what was written into it.

    `grantee` is `unit:<unit>` (the unit wrote into the compartment, or an
    Encounter names its Organization as serviceProvider), `region:<region>`
    (an Encounter of a unit of that region) or `specialty:<code>` (a case
    routed to that specialty). Keyed by grantee first: the access check asks
    "may these grantees see this patient" for each row a query returns.
    """

    __tablename__ = "care_relationship"
    __table_args__ = (PrimaryKeyConstraint("grantee", "patient_id"),)

    grantee: Mapped[str] = mapped_column(Text)
    patient_id: Mapped[str] = mapped_column(Text)
    granted_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("now()")
    )
