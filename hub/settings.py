"""Typed settings for every Waha process, read once from `WAHA_*` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from fastapi import Request
from pydantic import Field, PostgresDsn, RedisDsn, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PLACEHOLDER = "waha-dev"  # noqa: S105 - the documented dev default, refused in production


class Settings(BaseSettings):
    """Everything a Waha process needs to start; nothing else reads the environment."""

    model_config = SettingsConfigDict(env_prefix="WAHA_", extra="ignore")

    env: Literal["dev", "test", "production"] = "dev"
    database_url: PostgresDsn = PostgresDsn("postgresql+psycopg://waha_app@127.0.0.1:5432/waha")
    migration_database_url: PostgresDsn = PostgresDsn(
        "postgresql+psycopg://waha@127.0.0.1:5432/waha"
    )
    database_pool_size: int = 10
    # A ping per pool checkout costs a round trip on every request; without it a
    # connection broken by a database restart is found when used, the pool is
    # invalidated, and reads are repeated once on a fresh connection (hub.db.run_read).
    database_pool_pre_ping: bool = False
    # The API's bound on any one SQL statement, in milliseconds (0: none): a
    # runaway search or a lock waited on too long ends as a 503 instead of
    # holding a connection and a worker thread. Worker tasks are not bound.
    database_statement_timeout_ms: int = Field(default=30_000, ge=0)
    redis_url: RedisDsn = RedisDsn("redis://127.0.0.1:6379/0")
    public_base_url: str = "http://127.0.0.1:8000"

    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "waha"
    s3_secret_key: SecretStr = SecretStr(DEV_PLACEHOLDER)
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "waha-binaries"
    # Resumable (tus) uploads: the largest accepted Upload-Length (DESIGN.md
    # "Ingest rules": 2 GB), and how long an unfinished upload waits for its
    # next PATCH before the sweep removes it (each PATCH extends it).
    max_tus_upload_bytes: int = 2 * 1024**3
    tus_upload_expiry_hours: float = 24.0
    # Retention (issue "Deletion"): a deleted Binary's object is purged this
    # long after the deletion; an uploaded Binary that nothing links and that
    # names no patient or encounter is swept as an orphan after this age.
    binary_retention_days: float = Field(default=30.0, ge=0)
    orphan_binary_hours: float = Field(default=72.0, gt=0)
    # An object that no Binary, derived image or upload owns (a crash between
    # storing it and recording it) is removed after this age. At least an
    # hour: a request still recording its object must never lose it.
    stray_object_hours: float = Field(default=72.0, ge=1)
    # Downloads by redirect to a presigned URL (MinIO); the SDK's default
    # validity is 7 days, DESIGN.md allows at most 300 s.
    binary_download_redirect: bool = False
    binary_redirect_seconds: int = Field(default=300, gt=0, le=300)
    # The S3 endpoint clients can reach (host:port), when it differs from the
    # one the API uses: a presigned URL is signed for the host it names.
    s3_public_endpoint: str | None = None
    s3_public_secure: bool | None = None

    # Ingest limits (DESIGN.md "Ingest rules"); beyond them the API answers 413.
    max_json_body_bytes: int = 32 * 1024 * 1024
    max_bundle_entries: int = 5_000
    max_binary_bytes: int = 25 * 1024 * 1024
    enforce_referential_integrity: bool = True

    # How long a duplicate bundle waits for its in-flight twin before answering 409.
    idempotency_wait_seconds: float = 30.0
    default_page_size: int = 20
    max_page_size: int = 1_000

    outbox_batch_size: int = 200
    outbox_max_attempts: int = 8
    # Delivered outbox events are kept this long for tracing, then purged.
    outbox_retention_hours: float = 72.0

    # OpenID Connect (DESIGN.md "OIDC issuer"): tokens must carry `oidc_issuer`
    # as `iss`; discovery and keys are fetched from `oidc_internal_url`, which
    # differs inside docker-compose (http://keycloak:8080/realms/waha).
    oidc_issuer: str = "http://127.0.0.1:8080/realms/waha"
    oidc_internal_url: str = "http://127.0.0.1:8080/realms/waha"
    oidc_audience: str = "waha-api"
    # Clock skew tolerated on exp/nbf, and the shortest pause between two JWKS
    # fetches triggered by unknown key ids (a flood of made-up kids must not
    # turn into a flood of requests to the issuer).
    oidc_leeway_seconds: int = 30
    oidc_jwks_refetch_seconds: float = 10.0
    # How long a unit's Device status is trusted before it is read again: a
    # revoked unit's tokens stop working within this time (DESIGN.md: ≤ 30 s).
    unit_status_cache_seconds: float = 10.0
    # Where the embedded dev issuer keeps its signing keys across restarts.
    dev_issuer_data_dir: Path = Path("var/dev-issuer")

    log_json: bool = True
    sql_echo: bool = False

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _pin_psycopg_driver(cls, value: PostgresDsn) -> PostgresDsn:
        if value.scheme != "postgresql+psycopg":
            raise ValueError("database URLs must use the postgresql+psycopg:// driver")
        return value

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_production(self) -> Settings:
        if self.env == "production":
            if self.s3_secret_key.get_secret_value() == DEV_PLACEHOLDER:
                raise ValueError("WAHA_S3_SECRET_KEY must be set in production")
            if self.sql_echo:
                raise ValueError("SQL echo logs patient data; it is refused in production")
        return self

    @property
    def fhir_base_url(self) -> str:
        """Return the absolute FHIR base URL clients see."""
        return self.public_base_url.rstrip("/") + "/fhir"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Build the process's settings once."""
    return Settings()


async def request_settings(request: Request) -> Settings:
    """Return the settings of the application serving the request (a FastAPI dependency).

    Read from the app's state rather than through a dependency override: with
    any override present, FastAPI re-inspects every dependency on every request.
    """
    settings = getattr(request.app.state, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()
