"""Derive again what ingest derives from stored resources, when a migration changes the rules.

Migrations call this with the rows whose index a rule change affects: their
reference keys, patients and compartment are derived from the stored document
as the indexer now derives them, and the care relationships the original
writes would have granted under the new rule are granted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from fhir_api.repository import add_care_relationships
from fhir_api.search_index import extract_index
from fhir_api.search_index.encoding import localized
from fhir_api.writes import care_relationships

SIDE_TABLES = ("fhir_search_string", "fhir_search_date", "fhir_search_quantity", "fhir_search_uri")


def rederive_current(
    connection: Connection,
    rows: Sequence[Any],
    *,
    base_url: str,
    version_patients: bool,
) -> None:
    """Re-index current rows (type, id, version_id, author, resource) under today's rules.

    `version_patients`: the history table has its `patient_ids` column (0024 on).
    """
    session = Session(bind=connection)
    pairs: set[tuple[str, str]] = set()
    for resource_type, resource_id, version_id, author, document in rows:
        index = extract_index(localized(document, base_url))
        # The care relationships the write would have given under these rules:
        # its unit's, and an Encounter's serviceProvider's.
        unit = author.removeprefix("Device/") if (author or "").startswith("Device/") else None
        pairs |= care_relationships(session, [(resource_type, index)], unit=unit)
        patient_ids = sorted(index.patient_ids)
        compartment_key = resource_id if resource_type == "Patient" else None
        if compartment_key is None and patient_ids:
            compartment_key = patient_ids[0]
        owner = {"type": resource_type, "id": resource_id, "key": compartment_key}
        connection.execute(
            text(
                "UPDATE fhir_resource SET refs = CAST(:refs AS text[]),"
                " patient_ids = CAST(:patients AS text[]), compartment_key = :key"
                " WHERE resource_type = :type AND id = :id"
            ),
            {**owner, "refs": index.references, "patients": patient_ids},
        )
        for table in SIDE_TABLES:
            connection.execute(
                text(
                    f"UPDATE {table} SET compartment_key = :key"  # noqa: S608 - fixed names
                    " WHERE resource_type = :type AND resource_id = :id"
                ),
                owner,
            )
        connection.execute(
            text(
                "UPDATE fhir_resource_version SET compartment_key = :key"
                " WHERE resource_type = :type AND id = :id"
            ),
            owner,
        )
        if version_patients:
            connection.execute(
                text(
                    "UPDATE fhir_resource_version SET patient_ids = CAST(:patients AS text[])"
                    " WHERE resource_type = :type AND id = :id AND version_id = :version"
                ),
                {**owner, "patients": patient_ids, "version": version_id},
            )
    add_care_relationships(session, pairs)
    session.flush()


def rederive_history(connection: Connection, owners: Sequence[Any], *, base_url: str) -> None:
    """Derive each version's patients for resources (type, id) with several versions or deleted.

    A deletion keeps the patients of the version it ends, on its history row
    and, when it is the current one, on the tombstone.
    """
    for resource_type, resource_id in owners:
        key = {"type": resource_type, "id": resource_id}
        versions = connection.execute(
            text(
                "SELECT version_id, deleted, resource FROM fhir_resource_version"
                " WHERE resource_type = :type AND id = :id ORDER BY version_id"
            ),
            key,
        ).all()
        patients: list[str] = []
        for version_id, deleted, document in versions:
            if not deleted and document is not None:
                patients = sorted(extract_index(localized(document, base_url)).patient_ids)
            connection.execute(
                text(
                    "UPDATE fhir_resource_version SET patient_ids = CAST(:patients AS text[])"
                    " WHERE resource_type = :type AND id = :id AND version_id = :version"
                ),
                {**key, "version": version_id, "patients": patients},
            )
        if versions and versions[-1][1]:
            compartment_key = resource_id if resource_type == "Patient" else None
            if compartment_key is None and patients:
                compartment_key = patients[0]
            connection.execute(
                text(
                    "UPDATE fhir_resource SET patient_ids = CAST(:patients AS text[]),"
                    " compartment_key = :compartment WHERE resource_type = :type AND id = :id"
                ),
                {**key, "patients": patients, "compartment": compartment_key},
            )
