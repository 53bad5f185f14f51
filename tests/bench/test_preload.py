"""The bulk preload leaves an analyzed store behind."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, create_engine, text

from bench.preload import analyze_store
from hub.settings import Settings


def test_analyze_store_collects_statistics(
    settings: Settings, committed: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    owner_url = str(settings.migration_database_url)
    analyze_store(owner_url)
    assert "VACUUM (ANALYZE) done" in capsys.readouterr().out
    engine = create_engine(owner_url)
    with engine.connect() as connection:
        analyzed = connection.execute(
            text(
                "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables "
                "WHERE relname = 'fhir_resource'"
            )
        ).scalar_one()
    engine.dispose()
    assert analyzed


def test_analyze_store_reports_a_role_that_may_not(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    analyze_store(str(settings.migration_database_url).replace("waha@", "waha_nobody@"))
    assert "failed" in capsys.readouterr().out
