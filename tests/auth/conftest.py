"""Fixtures for the auth tests: a real dev issuer over HTTP on a free port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jwcrypto import jwk, jwt

from auth.dev_issuer.keys import KeyStore
from hub.settings import Settings
from tests.servers import free_port, serve

__all__ = ["free_port", "serve"]

REALM = "waha"


def issuer_settings(data_dir: Path) -> Settings:
    """Settings of a test dev issuer keeping its keys in `data_dir`."""
    return Settings(env="test", dev_issuer_data_dir=data_dir, log_json=True)


def decode_unverified(token: str) -> dict[str, Any]:
    """Return a JWT's claims without checking anything (for assertions only)."""
    parsed = jwt.JWT(jwt=token)
    claims: dict[str, Any] = jwt.json_decode(parsed.token.objects["payload"])
    return claims


def sign(
    claims: dict[str, Any], key: jwk.JWK, *, alg: str = "RS256", kid: str | None = None
) -> str:
    """Sign claims as a compact JWS with the given key."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    header["kid"] = kid if kid is not None else key.get("kid")
    token = jwt.JWT(header=header, claims=claims)
    token.make_signed_token(key)
    return str(token.serialize())


def issuer_key(data_dir: Path) -> jwk.JWK:
    """Return the private signing key the dev issuer of `data_dir` uses now."""
    return KeyStore(data_dir, retention_seconds=3600).active().key
