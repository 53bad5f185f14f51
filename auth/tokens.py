"""Validate bearer access tokens from the OIDC issuer into a typed Principal.

python-keycloak's `KeycloakOpenID` fetches the issuer's keys and verifies each
token (jwcrypto underneath); this module adds what a resource server must
decide itself: which issuer and audience count, which algorithms, how long the
keys are cached, and what the token's claims mean for Waha.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from jwcrypto import jwk, jws, jwt
from jwcrypto.common import JWException
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakError

from auth.errors import InvalidToken, IssuerUnavailable
from hub.settings import Settings

log = structlog.get_logger()

# Asymmetric only: `none` and HS* would let anyone who knows a public key
# (or nothing at all) mint tokens.
ALLOWED_ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_CHARS = 16_384


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as a valid access token says."""

    subject: str
    client_id: str
    username: str | None
    roles: frozenset[str]
    unit: str | None
    region: str | None
    community: str | None
    specialty: str | None
    scopes: frozenset[str]
    token_id: str | None
    expires_at: int

    def has_role(self, role: str) -> bool:
        """Return whether the token grants this realm role."""
        return role in self.roles


def split_realm_url(url: str) -> tuple[str, str]:
    """Split `http://host/realms/<realm>` into python-keycloak's server URL and realm name."""
    server_url, marker, realm = url.rstrip("/").rpartition("/realms/")
    if not marker or not realm or "/" in realm:
        raise ValueError(f"not a Keycloak realm URL (…/realms/<realm>): {url}")
    return server_url + "/", realm


def _optional_string(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Build the Principal from a verified access token's claims."""
    realm_access = claims.get("realm_access")
    raw_roles = realm_access.get("roles", []) if isinstance(realm_access, dict) else []
    scope = claims.get("scope")
    client_id = _optional_string(claims, "azp") or _optional_string(claims, "client_id")
    subject = _optional_string(claims, "sub")
    if subject is None or client_id is None:
        raise InvalidToken("the token names no subject or client")
    return Principal(
        subject=subject,
        client_id=client_id,
        username=_optional_string(claims, "preferred_username"),
        roles=frozenset(role for role in raw_roles if isinstance(role, str)),
        unit=_optional_string(claims, "waha_unit"),
        region=_optional_string(claims, "waha_region"),
        community=_optional_string(claims, "waha_community"),
        specialty=_optional_string(claims, "waha_specialty"),
        scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
        token_id=_optional_string(claims, "jti"),
        expires_at=int(claims["exp"]),
    )


class TokenValidator:
    """Check access tokens against the issuer's keys, cached in this process.

    The key set is fetched once and again only when a token names a key id it
    does not hold (the issuer rotated its keys), at most once per
    `refetch_interval_seconds`, so made-up key ids cannot make Waha hammer the
    issuer. Safe to share between threads.
    """

    def __init__(
        self,
        *,
        issuer: str,
        internal_url: str,
        audience: str,
        leeway_seconds: int = 30,
        refetch_interval_seconds: float = 10.0,
        timeout_seconds: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        server_url, realm = split_realm_url(internal_url)
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.refetch_interval_seconds = refetch_interval_seconds
        self._clock = clock
        self._openid = KeycloakOpenID(
            server_url=server_url, realm_name=realm, client_id=audience, timeout=timeout_seconds
        )
        self._keys: jwk.JWKSet | None = None
        self._fetched_at: float | None = None
        self._lock = threading.Lock()
        self.key_fetches = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenValidator:
        """Build the validator the settings describe."""
        return cls(
            issuer=settings.oidc_issuer,
            internal_url=settings.oidc_internal_url,
            audience=settings.oidc_audience,
            leeway_seconds=settings.oidc_leeway_seconds,
            refetch_interval_seconds=settings.oidc_jwks_refetch_seconds,
        )

    def validate(self, token: str) -> Principal:
        """Verify a bearer access token and return who it speaks for."""
        header = self._header(token)
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise InvalidToken("signing algorithm not allowed")
        keys = self._key_set(header.get("kid"))
        try:
            claims = self._openid.decode_token(
                token,
                validate=True,
                key=keys,
                algs=list(ALLOWED_ALGORITHMS),
                expected_type="JWS",
                leeway=self.leeway_seconds,
                # exp is required and checked with the leeway (None = now);
                # iss must match exactly; aud must contain the API's audience.
                check_claims={"iss": self.issuer, "aud": self.audience, "exp": None},
            )
        except jwt.JWTExpired as error:
            raise InvalidToken("the token has expired") from error
        except jwt.JWTMissingClaim as error:
            raise InvalidToken(str(error)) from error
        except jwt.JWTInvalidClaimValue as error:
            raise InvalidToken(_claim_reason(str(error))) from error
        except (JWException, ValueError, TypeError) as error:
            # Bad signature, tampered payload or header, undecodable JSON.
            raise InvalidToken("the token signature or format is invalid") from error
        if not isinstance(claims, dict):
            raise InvalidToken("the token payload is not a JSON object")
        self._check_times_and_type(claims)
        return principal_from_claims(claims)

    def _header(self, token: str) -> dict[str, Any]:
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
            raise InvalidToken("the token is not a compact JWS")
        envelope = jws.JWS()
        try:
            envelope.deserialize(token)
            header = envelope.jose_header
        except (JWException, ValueError, TypeError) as error:
            raise InvalidToken("the token is not a compact JWS") from error
        if not isinstance(header, dict):
            raise InvalidToken("the token header is not a JSON object")
        return header

    def _check_times_and_type(self, claims: dict[str, Any]) -> None:
        now = time.time()
        not_before = claims.get("nbf")
        # jwcrypto skips nbf when explicit claim checks are given; Keycloak's
        # own tokens carry none, so it is checked only when present.
        if isinstance(not_before, int | float) and not_before > now + self.leeway_seconds:
            raise InvalidToken("the token is not valid yet")
        token_type = claims.get("typ")
        # An ID or refresh token is not an access token, whatever its audience.
        if token_type is not None and str(token_type).lower() != "bearer":
            raise InvalidToken("the token is not an access token")

    def _key_set(self, kid: object) -> jwk.JWKSet:
        keys = self._keys
        if keys is None:
            return self._fetch()
        if isinstance(kid, str) and keys.get_key(kid) is None:
            keys = self._fetch()
            if keys.get_key(kid) is None:
                raise InvalidToken("the token is signed with an unknown key")
        return keys

    def _fetch(self) -> jwk.JWKSet:
        """Fetch the issuer's key set, unless fetched within the refetch interval."""
        with self._lock:
            now = self._clock()
            recent = (
                self._fetched_at is not None
                and now - self._fetched_at < self.refetch_interval_seconds
            )
            if self._keys is not None and recent:
                return self._keys
            try:
                certs = self._openid.certs()
            except (KeycloakError, OSError) as error:
                log.warning("auth.jwks_fetch_failed", error_type=type(error).__name__)
                if self._keys is None:
                    raise IssuerUnavailable("the token issuer's keys cannot be fetched") from error
                self._fetched_at = now
                return self._keys
            keys = jwk.JWKSet()
            for entry in certs.get("keys", []):
                if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") not in (
                    ALLOWED_ALGORITHMS
                ):
                    continue
                keys.add(jwk.JWK(**entry))
            self._keys = keys
            self._fetched_at = now
            self.key_fetches += 1
            log.info("auth.jwks_fetched", keys=len(keys["keys"]))
            return keys


def _claim_reason(message: str) -> str:
    """Turn jwcrypto's claim message (which quotes token values) into a fixed reason."""
    for claim, reason in (
        ("'iss'", "the token is from another issuer"),
        ("'aud'", "the token is not meant for this API"),
        ("'typ'", "the token is not an access token"),
    ):
        if claim in message:
            return reason
    return "a token claim is invalid"
