"""The dev issuer application: `uvicorn auth.dev_issuer.app:create_issuer_app --factory`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from jwcrypto import jwk

from auth.dev_issuer.errors import DevIssuerRefused, OAuthError
from auth.dev_issuer.keys import KeyStore
from auth.dev_issuer.realm import REALM_FILE, Realm, load_realm
from auth.dev_issuer.router import build_router, oauth_error_response
from auth.dev_issuer.service import DevIssuer
from hub.logging import configure_logging
from hub.settings import Settings, get_settings

# A retired key stays published this long beyond the longest token lifetime,
# so a token signed just before a rotation still verifies until it expires.
KEY_RETENTION_MARGIN_SECONDS = 60


def refuse_production(settings: Settings) -> None:
    """Stop here if this process is configured as production."""
    if settings.env == "production":
        raise DevIssuerRefused(
            "the embedded dev OIDC issuer refuses to start with WAHA_ENV=production: "
            "it hands out tokens for published dev passwords and secrets. "
            "Use Keycloak (docker-compose) and point WAHA_OIDC_ISSUER at it."
        )


def key_store(settings: Settings, realm: Realm) -> KeyStore:
    """Return the key store of the dev data folder, keeping keys as long as their tokens."""
    longest = max(realm.access_token_lifespan, realm.session_idle_timeout)
    return KeyStore(
        settings.dev_issuer_data_dir, retention_seconds=longest + KEY_RETENTION_MARGIN_SECONDS
    )


def create_issuer_app(
    settings: Settings | None = None, *, realm_file: Path = REALM_FILE
) -> FastAPI:
    """Build the dev issuer for the realm file; refuse in production."""
    settings = settings or get_settings()
    refuse_production(settings)
    configure_logging(settings)
    realm = load_realm(realm_file)
    keys = key_store(settings, realm)
    keys.active()  # the first start creates the signing key, not the first request
    issuer = DevIssuer(realm, keys, client_keys_dir=settings.dev_issuer_data_dir / "client-keys")
    app = FastAPI(title="Waha dev OIDC issuer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.issuer = issuer
    app.include_router(build_router(issuer))

    @app.exception_handler(OAuthError)
    async def _oauth_error(_request: Request, error: OAuthError) -> Response:
        return oauth_error_response(error)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Answer that the issuer is up."""
        return {"status": "ok"}

    return app


def register_client_key(
    settings: Settings, realm: Realm, *, client_id: str, jwks_text: str
) -> Path:
    """Store a confidential client's public JWKS, for private_key_jwt authentication."""
    client = realm.clients.get(client_id)
    if client is None or client.public or client.bearer_only:
        raise ValueError(f"{client_id} is not a confidential client of realm {realm.name}")
    keys = jwk.JWKSet.from_json(jwks_text)
    if any(key.has_private for key in keys):
        # The issuer needs only the public half; a private key has no business here.
        raise ValueError("the JWKS holds a private key; register the public key only")
    folder = settings.dev_issuer_data_dir / "client-keys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{client_id}.json"
    path.write_text(keys.export(private_keys=False), encoding="utf-8")
    return path
