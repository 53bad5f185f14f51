"""Database engine, sessions and the declarative base shared by every domain."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends
from sqlalchemy import Engine, MetaData, create_engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from hub.settings import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """The one declarative base; its naming convention keeps Alembic names stable."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


session_factory: sessionmaker[Session] = sessionmaker(expire_on_commit=False)
_engine: Engine | None = None


def make_engine(settings: Settings, *, url: str | None = None) -> Engine:
    """Create an engine for the application role (or the given URL)."""
    return create_engine(
        url or str(settings.database_url),
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        echo=settings.sql_echo,
    )


def configure(settings: Settings) -> Engine:
    """Bind the process-wide session factory to a new engine, once per process."""
    global _engine  # noqa: PLW0603 - one engine per process is the point
    if _engine is None:
        _engine = make_engine(settings)
        session_factory.configure(bind=_engine)
    return _engine


def get_session() -> Iterator[Session]:
    """Yield the request's session; commit if the handler succeeds."""
    with session_factory() as session, session.begin():
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@contextmanager
def session_scope() -> Iterator[Session]:
    """Run one unit of work outside a request; commit on success."""
    with session_factory() as session, session.begin():
        yield session
