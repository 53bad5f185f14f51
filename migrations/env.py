"""Alembic environment: migrations run as the schema owner, never as the app role."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import auth.audit.models  # noqa: F401 - registers the audit trail's table
import fhir_api.models  # noqa: F401 - registers the record store's tables
import hub.outbox  # noqa: F401 - registers the outbox table
import imaging_store.derivatives.models  # noqa: F401 - registers the derivatives table
import imaging_store.models  # noqa: F401 - registers the imaging store's table
import imaging_store.uploads.models  # noqa: F401 - registers the tus upload table
from hub.db import Base
from hub.settings import get_settings

target_metadata = Base.metadata
# Indexes on a collation-qualified column reflect as on the plain column, so
# autogenerate would always see a difference; tests check their definition.
UNCOMPARED_INDEXES = frozenset({"ix_fhir_search_string_walk"})


def _include_object(
    _object: object, name: str | None, type_: str, _reflected: bool, _compare_to: object
) -> bool:
    return not (type_ == "index" and name in UNCOMPARED_INDEXES)


def _url() -> str:
    configured = context.config.attributes.get("url")
    return str(configured or get_settings().migration_database_url)


def run_migrations_offline() -> None:
    """Emit SQL without a connection."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations on a live connection."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, include_object=_include_object
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, include_object=_include_object
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
