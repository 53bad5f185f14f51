"""The `waha` command: migrations, demo data, outbox care, the dev stack and dev issuer."""

from __future__ import annotations

from pathlib import Path

import typer
from alembic import command
from alembic.config import Config

from hub import db, outbox
from hub.settings import get_settings

app = typer.Typer(help="Waha platform commands.", no_args_is_help=True)
outbox_app = typer.Typer(help="Inspect and replay the outbox.")
app.add_typer(outbox_app, name="outbox")
dev_issuer_app = typer.Typer(help="The embedded development OIDC issuer (never in production).")
app.add_typer(dev_issuer_app, name="dev-issuer")


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


@dev_issuer_app.command("rotate-keys")
def dev_issuer_rotate_keys() -> None:
    """Create a new signing key; the old one stays published until its tokens expire."""
    from auth.dev_issuer import app as issuer_app  # noqa: PLC0415 - dev-only code
    from auth.dev_issuer.realm import load_realm  # noqa: PLC0415 - dev-only code

    settings = get_settings()
    issuer_app.refuse_production(settings)
    keys = issuer_app.key_store(settings, load_realm())
    key = keys.rotate()
    published = ", ".join(item.kid for item in keys.published())
    print(f"waha: dev issuer now signs with {key.kid}; published keys: {published}")


@dev_issuer_app.command("register-client-key")
def dev_issuer_register_client_key(client_id: str, public_jwks_file: Path) -> None:
    """Register a unit's public key(s) (a JWKS file) for private_key_jwt client authentication."""
    from auth.dev_issuer import app as issuer_app  # noqa: PLC0415 - dev-only code
    from auth.dev_issuer.realm import load_realm  # noqa: PLC0415 - dev-only code

    settings = get_settings()
    issuer_app.refuse_production(settings)
    path = issuer_app.register_client_key(
        settings, load_realm(), client_id=client_id, jwks_text=public_jwks_file.read_text()
    )
    print(f"waha: {client_id} may now authenticate with private_key_jwt (keys in {path})")


@app.command()
def dev(
    api_port: int = 8000,
    s3_port: int = 9000,
    issuer_port: int = 8080,
    demo: bool = True,
) -> None:
    """Run the development stack (local S3, dev OIDC issuer, API, worker) until Ctrl-C."""
    from auth.dev_issuer.realm import load_realm  # noqa: PLC0415 - dev-only code
    from auth.dev_issuer.service import token_commands  # noqa: PLC0415 - dev-only code
    from hub import devstack  # noqa: PLC0415 - dev-only code

    realm = load_realm()
    token_url = f"http://127.0.0.1:{issuer_port}/realms/{realm.name}/protocol/openid-connect/token"
    devstack.run(
        api_port=api_port,
        s3_port=s3_port,
        load_demo=demo,
        issuer_port=issuer_port,
        realm_name=realm.name,
        token_commands=token_commands(realm, token_url),
    )
