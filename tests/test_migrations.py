"""Migrations: they match the models, and they go down and up again cleanly."""

from __future__ import annotations

from alembic import command
from sqlalchemy import create_engine, text

from hub.cli import alembic_config
from hub.settings import Settings
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


def test_downgrade_to_base_and_upgrade_again(
    settings: Settings, run_id: str, worker_id: str
) -> None:
    name = f"waha_migrations_{run_id}_{worker_id}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}" OWNER {OWNER_ROLE}'))
    url = str(settings.migration_database_url).rsplit("/", 1)[0] + f"/{name}"
    try:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        command.check(config)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
