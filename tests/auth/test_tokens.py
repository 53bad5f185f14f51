"""Bearer-token validation: real dev-issuer tokens accepted, every fault refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jwcrypto import jwk

from auth.dev_issuer.app import create_issuer_app, key_store
from auth.dev_issuer.realm import load_realm
from auth.errors import InvalidToken, IssuerUnavailable
from auth.tokens import Principal, TokenValidator, split_realm_url
from tests.auth.conftest import (
    REALM,
    decode_unverified,
    free_port,
    issuer_key,
    issuer_settings,
    serve,
    sign,
)


def password_token(token_url: str, username: str) -> dict[str, Any]:
    response = httpx.post(
        token_url,
        data={
            "grant_type": "password",
            "client_id": "waha-cli",
            "username": username,
            "password": "waha-dev",
            "scope": "openid",
        },
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def unit_token(token_url: str, unit: str = "unit-01") -> str:
    response = httpx.post(
        token_url, data={"grant_type": "client_credentials"}, auth=(unit, f"{unit}-secret")
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@pytest.fixture
def validator(issuer_url: str) -> TokenValidator:
    """A fresh validator of the shared issuer (its own key cache)."""
    return TokenValidator(issuer=issuer_url, internal_url=issuer_url, audience="waha-api")


@pytest.fixture
def good_claims(token_url: str) -> dict[str, Any]:
    """The claims of a real access token, to derive faulty ones from."""
    return decode_unverified(password_token(token_url, "relay")["access_token"])


def refused(validator: TokenValidator, token: str) -> str:
    with pytest.raises(InvalidToken) as error:
        validator.validate(token)
    assert error.value.status == 401
    assert error.value.headers["WWW-Authenticate"].startswith(
        'Bearer realm="waha", error="invalid_token"'
    )
    return error.value.detail


# -- accepted ----------------------------------------------------------------------------


def test_user_token_becomes_a_principal(validator: TokenValidator, token_url: str) -> None:
    token = password_token(token_url, "specialist.derm")["access_token"]
    principal = validator.validate(token)
    claims = decode_unverified(token)
    assert principal == Principal(
        subject=claims["sub"],
        client_id="waha-cli",
        username="specialist.derm",
        roles=frozenset({"specialist"}),
        unit=None,
        region=None,
        community=None,
        specialty="394582007",
        scopes=frozenset({"openid", "profile", "email"}),
        token_id=claims["jti"],
        expires_at=claims["exp"],
    )
    assert principal.has_role("specialist")
    assert not principal.has_role("admin")


def test_relay_token_carries_region_and_community(
    validator: TokenValidator, token_url: str
) -> None:
    principal = validator.validate(password_token(token_url, "relay")["access_token"])
    assert (principal.region, principal.community) == ("marrakech-safi", "sidi-bouzid")
    assert principal.roles == {"relay"}


def test_unit_token_becomes_a_principal(validator: TokenValidator, token_url: str) -> None:
    principal = validator.validate(unit_token(token_url, "unit-02"))
    assert principal.client_id == "unit-02"
    assert principal.username == "service-account-unit-02"
    assert principal.roles == {"unit"}
    assert (principal.unit, principal.region) == ("unit-02", "oriental")


def test_keys_are_fetched_once_not_per_request(validator: TokenValidator, token_url: str) -> None:
    for _ in range(5):
        validator.validate(unit_token(token_url))
    assert validator.key_fetches == 1


def test_leeway_accepts_a_token_just_expired(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    now = int(time.time())
    token = sign({**good_claims, "exp": now - 5}, issuer_key(issuer_data_dir))
    assert validator.validate(token).subject == good_claims["sub"]


# -- refused -----------------------------------------------------------------------------


def test_expired(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    now = int(time.time())
    claims = {**good_claims, "iat": now - 900, "nbf": now - 900, "exp": now - 600}
    assert refused(validator, sign(claims, issuer_key(issuer_data_dir))) == "the token has expired"


def test_without_expiry(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    claims = {key: value for key, value in good_claims.items() if key != "exp"}
    assert "exp" in refused(validator, sign(claims, issuer_key(issuer_data_dir)))


def test_not_yet_valid(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    now = int(time.time())
    claims = {**good_claims, "nbf": now + 600, "exp": now + 900}
    token = sign(claims, issuer_key(issuer_data_dir))
    assert refused(validator, token) == "the token is not valid yet"


def test_wrong_issuer(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    claims = {**good_claims, "iss": "http://127.0.0.1:8080/realms/other"}
    token = sign(claims, issuer_key(issuer_data_dir))
    assert refused(validator, token) == "the token is from another issuer"


@pytest.mark.parametrize("audience", ["account", ["account", "waha-web"], "waha-api-x"])
def test_wrong_audience(
    validator: TokenValidator,
    issuer_data_dir: Path,
    good_claims: dict[str, Any],
    audience: str | list[str],
) -> None:
    token = sign({**good_claims, "aud": audience}, issuer_key(issuer_data_dir))
    assert refused(validator, token) == "the token is not meant for this API"


def test_audience_list_containing_the_api_is_accepted(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    token = sign({**good_claims, "aud": ["account", "waha-api"]}, issuer_key(issuer_data_dir))
    assert validator.validate(token).username == "relay"


def test_alg_none(validator: TokenValidator, good_claims: dict[str, Any]) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(good_claims).encode())
    assert refused(validator, f"{header}.{payload}.") == "signing algorithm not allowed"


def test_hs256_signed_with_the_public_key(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    """The classic key-confusion attack: the public key used as an HMAC secret."""
    signing = issuer_key(issuer_data_dir)
    public_pem = jwk.JWK(**signing.export_public(as_dict=True)).export_to_pem()
    hmac_key = jwk.JWK(kty="oct", k=b64(public_pem))
    token = sign(good_claims, hmac_key, alg="HS256", kid=signing.get("kid"))
    assert refused(validator, token) == "signing algorithm not allowed"


def test_tampered_payload(validator: TokenValidator, token_url: str) -> None:
    token = password_token(token_url, "relay")["access_token"]
    header, payload, signature = token.split(".")
    claims = decode_unverified(token)
    claims["realm_access"] = {"roles": ["admin"]}
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert refused(validator, forged) == "the token signature or format is invalid"


def test_tampered_signature(validator: TokenValidator, token_url: str) -> None:
    token = unit_token(token_url)
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[10] != "A" else "B").join((signature[:10], signature[11:]))
    assert refused(validator, f"{header}.{payload}.{flipped}") == (
        "the token signature or format is invalid"
    )


def test_unknown_kid_refetches_once_then_refuses(
    validator: TokenValidator, good_claims: dict[str, Any], token_url: str
) -> None:
    validator.validate(unit_token(token_url))
    assert validator.key_fetches == 1
    stranger = jwk.JWK.generate(kty="RSA", size=2048, kid="not-the-issuers")
    token = sign(good_claims, stranger)
    # Refetch interval not yet elapsed: no new fetch.
    assert refused(validator, token) == "the token is signed with an unknown key"
    assert validator.key_fetches == 1
    eager = TokenValidator(
        issuer=validator.issuer,
        internal_url=validator.issuer,
        audience="waha-api",
        refetch_interval_seconds=0,
    )
    eager.validate(unit_token(token_url))
    assert refused(eager, token) == "the token is signed with an unknown key"
    assert eager.key_fetches == 2  # it did look again before refusing


def test_foreign_key_reusing_the_issuers_kid(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    stranger = jwk.JWK.generate(kty="RSA", size=2048)
    token = sign(good_claims, stranger, kid=issuer_key(issuer_data_dir).get("kid"))
    assert refused(validator, token) == "the token signature or format is invalid"


def test_id_and_refresh_tokens_are_not_access_tokens(
    validator: TokenValidator, token_url: str
) -> None:
    answer = password_token(token_url, "admin")
    assert refused(validator, answer["id_token"]) == "the token is not meant for this API"
    assert refused(validator, answer["refresh_token"]) == "the token is not meant for this API"


def test_access_token_typ_must_be_bearer(
    validator: TokenValidator, issuer_data_dir: Path, good_claims: dict[str, Any]
) -> None:
    token = sign({**good_claims, "typ": "ID"}, issuer_key(issuer_data_dir))
    assert refused(validator, token) == "the token is not an access token"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "x" * 20_000, "Bearer x.y.z"])
def test_garbage(validator: TokenValidator, garbage: str) -> None:
    refused(validator, garbage)


def test_issuer_down_is_unavailable_not_invalid(good_claims: dict[str, Any]) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/realms/{REALM}"
    validator = TokenValidator(issuer=nowhere, internal_url=nowhere, audience="waha-api")
    stranger = jwk.JWK.generate(kty="RSA", size=2048, kid="k")
    with pytest.raises(IssuerUnavailable):
        validator.validate(sign(good_claims, stranger))


def test_realm_url_is_split_for_python_keycloak() -> None:
    assert split_realm_url("http://keycloak:8080/realms/waha") == ("http://keycloak:8080/", "waha")
    assert split_realm_url("https://id.example/auth/realms/waha/") == (
        "https://id.example/auth/",
        "waha",
    )
    with pytest.raises(ValueError, match="realm URL"):
        split_realm_url("http://keycloak:8080/")


# -- key rotation ------------------------------------------------------------------------


@pytest.fixture
def rotating_issuer(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A dev issuer of its own (rotating keys must not disturb the shared one)."""
    with serve(create_issuer_app(issuer_settings(tmp_path))) as base:
        yield f"{base}/realms/{REALM}", tmp_path


def test_rotation_keeps_old_tokens_valid_until_they_expire(
    rotating_issuer: tuple[str, Path],
) -> None:
    issuer, data_dir = rotating_issuer
    token_url = f"{issuer}/protocol/openid-connect/token"
    validator = TokenValidator(
        issuer=issuer, internal_url=issuer, audience="waha-api", refetch_interval_seconds=0
    )
    before = unit_token(token_url)
    validator.validate(before)
    old_kid = decode_header_kid(before)

    # What `waha dev-issuer rotate-keys` does, on the running issuer's data folder.
    new_kid = key_store(issuer_settings(data_dir), load_realm()).rotate().kid
    assert new_kid != old_kid

    certs = httpx.get(f"{issuer}/protocol/openid-connect/certs").json()
    assert {key["kid"] for key in certs["keys"]} == {old_kid, new_kid}
    after = unit_token(token_url)
    assert decode_header_kid(after) == new_kid
    assert validator.validate(after).unit == "unit-01"  # refetched on the new kid
    assert validator.key_fetches == 2
    assert validator.validate(before).unit == "unit-01"  # the old key still verifies

    # Once the longest token lifetime has passed, the old key is withdrawn.
    store = key_store(issuer_settings(data_dir), load_realm())
    for path in (data_dir / "keys").glob("*.json"):
        record = json.loads(path.read_text())
        if record["retired_at"] is not None:
            record["retired_at"] -= store.retention_seconds + 1
            # Written aside and renamed, as the key store itself writes.
            path.with_suffix(".tmp").write_text(json.dumps(record))
            path.with_suffix(".tmp").replace(path)
    certs = httpx.get(f"{issuer}/protocol/openid-connect/certs").json()
    assert [key["kid"] for key in certs["keys"]] == [new_kid]


def decode_header_kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])
