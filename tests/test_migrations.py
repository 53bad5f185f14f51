"""Migrations: they match the models, and they go down and up again cleanly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

from alembic import command
from sqlalchemy import create_engine, make_url, text

from fhir_api.search_index import extract_index
from hub.cli import alembic_config
from hub.settings import Settings, get_settings
from tests.conftest import ADMIN_URL, OWNER_ROLE


def test_models_and_migrations_agree(settings: Settings, db_engine: object) -> None:
    command.check(alembic_config(str(settings.migration_database_url)))


def test_the_string_index_is_in_byte_order_with_the_id_as_key(
    settings: Settings, db_engine: object
) -> None:
    """Autogenerate cannot compare it (see migrations/env.py): its definition is checked here."""
    engine = create_engine(str(settings.migration_database_url))
    with engine.connect() as connection:
        definition = connection.execute(
            text("SELECT pg_get_indexdef('ix_fhir_search_string_walk'::regclass)")
        ).scalar_one()
    engine.dispose()
    assert definition.endswith(
        '(resource_type, param, value_normalized COLLATE "C", resource_id)'
    ), definition


@contextmanager
def _scratch_database(settings: Settings, name: str) -> Iterator[str]:
    """Create an empty database owned by the schema owner; yield its migration URL."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER {OWNER_ROLE}'))
    try:
        yield str(settings.migration_database_url).rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_downgrade_to_base_and_upgrade_again(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_migrations_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        command.check(config)


def _run_sql(url: str, sql: str) -> None:
    """Run one statement in its own transaction on the database at `url`."""
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(sql))
    engine.dispose()


def _invalidate(url: str, index: str) -> None:
    """Mark `index` as an interrupted CREATE INDEX CONCURRENTLY leaves it: invalid."""
    # Writing pg_index takes a superuser, as the admin URL is.
    admin = create_engine(make_url(ADMIN_URL).set(database=make_url(url).database))
    with admin.begin() as connection:
        connection.execute(
            text("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(:index)"),
            {"index": index},
        )
    admin.dispose()


def _index_state(url: str, index: str) -> tuple[str, bool]:
    """Return an index's definition and whether it is valid."""
    engine = create_engine(url)
    with engine.connect() as connection:
        definition, valid = connection.execute(
            text(
                "SELECT pg_get_indexdef(indexrelid), indisvalid FROM pg_index"
                " WHERE indexrelid = to_regclass(:index)"
            ),
            {"index": index},
        ).one()
    engine.dispose()
    return definition, valid


def test_a_half_built_string_walk_index_is_rebuilt(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_strings_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0013")
        _run_sql(url, "CREATE INDEX ix_fhir_search_string_walk ON fhir_search_string (param)")
        _invalidate(url, "ix_fhir_search_string_walk")
        command.upgrade(config, "0014")
        definition, valid = _index_state(url, "ix_fhir_search_string_walk")
        assert definition.endswith(
            '(resource_type, param, value_normalized COLLATE "C", resource_id)'
        ), definition
        assert valid


def test_date_rows_become_ordered_and_a_half_built_date_index_is_rebuilt(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_dates_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0014")
        engine = create_engine(url)
        with engine.begin() as connection:
            # Written by the indexer before 0016: a period whose start is after its end.
            connection.execute(
                text(
                    "INSERT INTO fhir_search_date (resource_type, resource_id, param, low, high)"
                    " VALUES ('Encounter', 'e1', 'date', '2031-05-10', '2031-04-20')"
                )
            )
            connection.execute(
                text("CREATE INDEX ix_fhir_search_date_by_start ON fhir_search_date (param)")
            )
        _invalidate(url, "ix_fhir_search_date_by_start")
        command.upgrade(config, "head")
        with engine.connect() as connection:
            row = connection.execute(text("SELECT low, high FROM fhir_search_date")).one()
        engine.dispose()
        definition, valid = _index_state(url, "ix_fhir_search_date_by_start")
        assert row.low < row.high
        assert row.low.date().isoformat() == "2031-04-20"
        assert definition.endswith("(resource_type, param, low, resource_id)")
        assert valid


def test_quantity_rows_written_before_gain_their_human_unit(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "valueQuantity": {
            "value": 26,
            "unit": "pack-years",
            "system": "http://unitsofmeasure.org",
            "code": "{pack-years}",
        },
        "referenceRange": [
            {"low": {"value": 4.5, "unit": "mmol/L", "code": "mmol/L"}},
        ],
        # The indexer never reads a contained resource for its container's
        # parameters: its unit must not become a row of the container.
        "contained": [
            {
                "resourceType": "Observation",
                "id": "inner",
                "valueQuantity": {"value": 4.5, "unit": "millimoles per litre", "code": "mmol/L"},
            }
        ],
    }
    with _scratch_database(settings, f"waha_quantities_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0016")
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                    " resource) VALUES ('Observation', 'o1', 1, now(), CAST(:body AS jsonb))"
                ),
                {"body": json.dumps(observation)},
            )
            # The rows the indexer wrote before 0017: the coded unit only.
            connection.execute(
                text(
                    "INSERT INTO fhir_search_quantity (resource_type, resource_id, param, value,"
                    " low, high, system, code) VALUES"
                    " ('Observation', 'o1', 'value-quantity', 26, 25.5, 26.5,"
                    "  'http://unitsofmeasure.org', '{pack-years}'),"
                    " ('Observation', 'o1', 'other-system', 26, 25.5, 26.5,"
                    "  'http://loinc.org', '{pack-years}'),"
                    " ('Observation', 'o1', 'range-low', 4.5, 4.45, 4.55, NULL, 'mmol/L')"
                )
            )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT param, value, system, code FROM fhir_search_quantity"
                    " ORDER BY param, system NULLS FIRST"
                )
            ).all()
        engine.dispose()
    assert [(row.param, float(row.value), row.system, row.code) for row in rows] == [
        ("other-system", 26.0, "http://loinc.org", "{pack-years}"),
        ("range-low", 4.5, None, "mmol/L"),
        ("value-quantity", 26.0, None, "pack-years"),
        ("value-quantity", 26.0, "http://unitsofmeasure.org", "{pack-years}"),
    ]


def test_resource_gin_indexes_keep_no_pending_list(settings: Settings, db_engine: object) -> None:
    """Autogenerate does not compare index storage options: they are checked here."""
    engine = create_engine(str(settings.migration_database_url))
    with engine.connect() as connection:
        options: dict[str, list[str]] = dict(
            connection.execute(
                text(
                    "SELECT relname, reloptions FROM pg_class WHERE relname IN"
                    " ('ix_fhir_resource_tokens', 'ix_fhir_resource_refs',"
                    " 'ix_fhir_resource_patient_ids')"
                )
            ).all()
        )
    engine.dispose()
    assert options == {
        "ix_fhir_resource_tokens": ["fastupdate=off"],
        "ix_fhir_resource_refs": ["fastupdate=off"],
        "ix_fhir_resource_patient_ids": ["fastupdate=off"],
    }


def test_the_pending_outbox_index_is_rebuilt_on_id_even_after_an_interrupted_build(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_outbox_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0018")
        # What a build interrupted before its swap leaves: an invalid index.
        _run_sql(url, "CREATE INDEX ix_outbox_event_pending_rebuilt ON outbox_event (topic)")
        _invalidate(url, "ix_outbox_event_pending_rebuilt")
        command.upgrade(config, "0019")
        definition, valid = _index_state(url, "ix_outbox_event_pending")
        assert definition.endswith("(id) WHERE (status = 'pending'::text)"), definition
        assert valid
        command.downgrade(config, "0018")
        definition, valid = _index_state(url, "ix_outbox_event_pending")
        assert definition.endswith("(available_at) WHERE (status = 'pending'::text)"), definition
        assert valid
        # A valid leftover of another shape (a downgrade that failed after its
        # build) is not taken for the new index.
        _run_sql(
            url,
            "CREATE INDEX ix_outbox_event_pending_rebuilt ON outbox_event (available_at)"
            " WHERE status = 'pending'",
        )
        command.upgrade(config, "0019")
        definition, valid = _index_state(url, "ix_outbox_event_pending")
        assert definition.endswith("(id) WHERE (status = 'pending'::text)"), definition
        assert valid


def test_the_several_patients_index_is_partial_and_rebuilt_after_an_interrupted_build(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_several_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0019")
        _run_sql(url, "CREATE INDEX ix_fhir_resource_several_patients ON fhir_resource (id)")
        _invalidate(url, "ix_fhir_resource_several_patients")
        command.upgrade(config, "0020")
        definition, valid = _index_state(url, "ix_fhir_resource_several_patients")
        assert definition.endswith("(resource_type, id) WHERE (cardinality(patient_ids) > 1)")
        assert valid
        command.downgrade(config, "0019")
        engine = create_engine(url)
        with engine.connect() as connection:
            left = connection.execute(
                text("SELECT to_regclass('ix_fhir_resource_several_patients')")
            ).scalar()
        engine.dispose()
        assert left is None


def test_locations_stored_before_gain_their_position_rows(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    position = {"latitude": 29.6974, "longitude": -9.7316}
    placed = {"resourceType": "Location", "id": "l1", "position": position}
    half = {"resourceType": "Location", "id": "l2", "position": {"longitude": -9.7316}}
    # What the indexer also reads: decimals as strings, longitudes past 180; not
    # latitudes past 90, nor what is no decimal.
    wrapped = {
        "resourceType": "Location",
        "id": "l3",
        "position": {"latitude": "10.5", "longitude": 190},
    }
    western = {
        "resourceType": "Location",
        "id": "l4",
        "position": {"latitude": 1, "longitude": -190.5},
    }
    polar = {"resourceType": "Location", "id": "l5", "position": {"latitude": 95, "longitude": 0}}
    garbled = {
        "resourceType": "Location",
        "id": "l6",
        "position": {"latitude": "1_0", "longitude": 0},
    }
    documents = (placed, half, wrapped, western, polar, garbled)
    with _scratch_database(settings, f"waha_positions_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0021")
        engine = create_engine(url)
        with engine.begin() as connection:
            for document in documents:
                connection.execute(
                    text(
                        "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                        " resource) VALUES ('Location', :id, 1, now(), CAST(:body AS jsonb))"
                    ),
                    {"id": document["id"], "body": json.dumps(document)},
                )
        command.upgrade(config, "head")
        # Down and up again, and again over the rows already there: no duplicates.
        command.downgrade(config, "0021")
        command.upgrade(config, "head")
        command.stamp(config, "0021")
        command.upgrade(config, "head")
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT resource_id, param, value, low, high FROM fhir_search_quantity"
                    " ORDER BY resource_id, param"
                )
            ).all()
        engine.dispose()
    assert [tuple(row) for row in rows][:2] == [
        ("l1", "near$latitude", Decimal("29.6974"), Decimal("29.6974"), Decimal("29.6974")),
        ("l1", "near$longitude", Decimal("-9.7316"), Decimal("-9.7316"), Decimal("-9.7316")),
    ]
    # The same rows as the indexer writes for a Location stored now.
    written = sorted(
        (str(document["id"]), *row[:4])
        for document in documents
        if document is not garbled
        for row in extract_index(document).quantities
    )
    assert [tuple(row) for row in rows] == written


def test_resources_naming_a_patient_by_this_servers_url_join_that_patients_compartment(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    base = get_settings().fhir_base_url
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"text": "pouls"},
        "subject": {"reference": f"{base}/Patient/p1"},
        "effectiveDateTime": "2026-11-20",
    }
    encounter = {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": f"{base}/Patient/p2"},
        "serviceProvider": {"reference": "Organization/unit-02"},
    }
    # What ingest wrote before: the absolute key as given, no patient.
    written = extract_index(observation)
    assert written.patient_ids == [] and f"subject={base}/Patient/p1" in written.references
    with _scratch_database(settings, f"waha_local_refs_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0022")
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                    " refs, resource) VALUES ('Observation', 'o1', 1, now(),"
                    " CAST(:refs AS text[]), CAST(:body AS jsonb))"
                ),
                {"refs": written.references, "body": json.dumps(observation)},
            )
            connection.execute(
                text(
                    "INSERT INTO fhir_search_date (resource_type, resource_id, param, low, high)"
                    " VALUES ('Observation', 'o1', 'date', now(), now())"
                )
            )
            # Written by unit-01, served by unit-02: both units get the patient.
            connection.execute(
                text(
                    "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                    " refs, author, resource) VALUES ('Encounter', 'e1', 1, now(),"
                    " CAST(:refs AS text[]), 'Device/unit-01', CAST(:body AS jsonb))"
                ),
                {"refs": extract_index(encounter).references, "body": json.dumps(encounter)},
            )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            row = connection.execute(
                text(
                    "SELECT refs, patient_ids, compartment_key, resource FROM fhir_resource"
                    " WHERE resource_type = 'Observation'"
                )
            ).one()
            granted = connection.execute(
                text("SELECT grantee, patient_id FROM care_relationship ORDER BY 1, 2")
            ).all()
            date_key = connection.execute(
                text("SELECT compartment_key FROM fhir_search_date")
            ).scalar_one()
        engine.dispose()
    local = {**observation, "subject": {"reference": "Patient/p1"}}
    assert row.refs == extract_index(local).references
    assert row.patient_ids == ["p1"]
    assert row.compartment_key == date_key == "p1"
    assert row.resource == observation  # the stored version is as it was written
    assert [tuple(pair) for pair in granted] == [("unit:unit-01", "p2"), ("unit:unit-02", "p2")]


def test_versions_and_deletions_stored_before_gain_their_patients(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    def observation(version: int, patient: str) -> dict[str, object]:
        return {
            "resourceType": "Observation",
            "id": "o1",
            "meta": {"versionId": str(version)},
            "status": "final",
            "code": {"text": "pouls"},
            "subject": {"reference": f"Patient/{patient}"},
        }

    versions = [(1, False, observation(1, "p1")), (2, False, observation(2, "p2")), (3, True, None)]
    with _scratch_database(settings, f"waha_version_patients_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0023")
        engine = create_engine(url)
        with engine.begin() as connection:
            # What a deletion left before: a tombstone naming no patient.
            connection.execute(
                text(
                    "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                    " deleted) VALUES ('Observation', 'o1', 3, now(), true)"
                )
            )
            for version, deleted, document in versions:
                connection.execute(
                    text(
                        "INSERT INTO fhir_resource_version (resource_type, id, version_id,"
                        " last_updated, method, deleted, resource) VALUES ('Observation', 'o1',"
                        " :version, now(), 'PUT', :deleted, CAST(:body AS jsonb))"
                    ),
                    {
                        "version": version,
                        "deleted": deleted,
                        "body": json.dumps(document) if document else None,
                    },
                )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            by_version = connection.execute(
                text("SELECT version_id, patient_ids FROM fhir_resource_version ORDER BY 1")
            ).all()
            tombstone = connection.execute(
                text("SELECT patient_ids, compartment_key FROM fhir_resource")
            ).one()
        engine.dispose()
    assert [tuple(row) for row in by_version] == [(1, ["p1"]), (2, ["p2"]), (3, ["p2"])]
    assert tuple(tombstone) == (["p2"], "p2")


def test_binaries_people_uploaded_become_theirs(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    with _scratch_database(settings, f"waha_binary_owners_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0024")
        engine = create_engine(url)
        with engine.begin() as connection:
            for binary_id, client, author in (
                ("b1", "waha-cli", "coordinator"),
                ("b2", "unit-01", "Device/unit-01"),
            ):
                # The uploader wrote version 1; an administrator deleted it since.
                connection.execute(
                    text(
                        "INSERT INTO fhir_resource_version (resource_type, id, version_id,"
                        " last_updated, method, author) VALUES ('Binary', :id, 1, now(), 'PUT',"
                        " :author), ('Binary', :id, 2, now(), 'DELETE', 'admin')"
                    ),
                    {"id": binary_id, "author": author},
                )
                connection.execute(
                    text(
                        "INSERT INTO binary_object (id, content_type, size, sha256, sha1,"
                        " object_key, owner_client_id, created_at) VALUES (:id, 'image/png', 1,"
                        " '\\x00', '\\x00', :id, :client, now())"
                    ),
                    {"id": binary_id, "client": client},
                )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, owner_client_id FROM binary_object"))
            owners = {str(row.id): str(row.owner_client_id) for row in rows}
        engine.dispose()
    assert owners == {"b1": "user:coordinator", "b2": "unit-01"}


def test_devices_naming_a_patient_stored_before_become_that_patients(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    device = {"resourceType": "Device", "id": "d1", "patient": {"reference": "Patient/p1"}}
    implant = {"resourceType": "Device", "id": "d2", "patient": {"reference": "Patient/p2"}}
    with _scratch_database(settings, f"waha_device_owner_{run_id}_{worker_id}") as url:
        config = alembic_config(url)
        command.upgrade(config, "0025")
        engine = create_engine(url)
        with engine.begin() as connection:
            # d1 live at version 1; d2 written, then deleted: what 0025 left.
            connection.execute(
                text(
                    "INSERT INTO fhir_resource (resource_type, id, version_id, last_updated,"
                    " deleted, author, refs, resource) VALUES"
                    " ('Device', 'd1', 1, now(), false, 'Device/unit-01',"
                    " ARRAY['patient=Patient/p1'], CAST(:d1 AS jsonb)),"
                    " ('Device', 'd2', 2, now(), true, 'admin', '{}', NULL)"
                ),
                {"d1": json.dumps(device)},
            )
            connection.execute(
                text(
                    "INSERT INTO fhir_resource_version (resource_type, id, version_id,"
                    " last_updated, method, deleted, author, resource) VALUES"
                    " ('Device', 'd1', 1, now(), 'POST', false, 'Device/unit-01',"
                    " CAST(:d1 AS jsonb)),"
                    " ('Device', 'd2', 1, now(), 'POST', false, 'admin', CAST(:d2 AS jsonb)),"
                    " ('Device', 'd2', 2, now(), 'DELETE', true, 'admin', NULL)"
                ),
                {"d1": json.dumps(device), "d2": json.dumps(implant)},
            )
        command.upgrade(config, "head")
        with engine.connect() as connection:
            current = connection.execute(
                text("SELECT id, patient_ids, compartment_key FROM fhir_resource ORDER BY id")
            ).all()
            versions = connection.execute(
                text(
                    "SELECT id, version_id, patient_ids FROM fhir_resource_version"
                    " ORDER BY id, version_id"
                )
            ).all()
            granted = connection.execute(
                text("SELECT grantee, patient_id FROM care_relationship")
            ).all()
        engine.dispose()
    assert [tuple(row) for row in current] == [("d1", ["p1"], "p1"), ("d2", ["p2"], "p2")]
    assert [tuple(row) for row in versions] == [
        ("d1", 1, ["p1"]),
        ("d2", 1, ["p2"]),
        ("d2", 2, ["p2"]),
    ]
    assert [tuple(pair) for pair in granted] == [("unit:unit-01", "p1")]
