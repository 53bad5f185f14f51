"""The `waha` command: migrations, demo data, outbox care and the dev stack."""

from __future__ import annotations

import typer
from alembic import command
from alembic.config import Config

from hub import db, outbox
from hub.settings import get_settings

app = typer.Typer(help="Waha platform commands.", no_args_is_help=True)
outbox_app = typer.Typer(help="Inspect and replay the outbox.")
app.add_typer(outbox_app, name="outbox")


def alembic_config(url: str | None = None) -> Config:
    """Return the Alembic configuration, optionally for another database URL."""
    config = Config("alembic.ini")
    if url:
        config.attributes["url"] = url
    return config


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest revision (as the owner role)."""
    command.upgrade(alembic_config(), "head")
    print("waha: database schema is at the newest revision")


@app.command("load-demo")
def load_demo(seed: int = 42) -> None:
    """Load the demo data set (idempotent: bundles replay, reference data updates)."""
    from bench.demo import load_demo_data  # noqa: PLC0415 - dev-only dependency path
    from hub.celery_app import enqueue_drain  # noqa: PLC0415 - Celery only when needed

    settings = get_settings()
    db.configure(settings)
    # As in the API: a running worker delivers the demo's events right away
    # instead of at its next periodic drain.
    outbox.set_notifier(enqueue_drain)
    counts = load_demo_data(settings, seed=seed)
    print(f"waha: demo data loaded ({counts})")


@outbox_app.command("replay")
def outbox_replay() -> None:
    """Re-queue every dead-lettered outbox event."""
    settings = get_settings()
    db.configure(settings)
    with db.session_scope() as session:
        count = outbox.replay_dead(session)
    print(f"waha: {count} dead-lettered events re-queued")


@app.command()
def dev(
    api_port: int = 8000,
    s3_port: int = 9000,
    demo: bool = True,
) -> None:
    """Run the development stack (local S3, API, worker) until Ctrl-C."""
    from hub import devstack  # noqa: PLC0415 - dev-only code

    devstack.run(api_port=api_port, s3_port=s3_port, load_demo=demo)
