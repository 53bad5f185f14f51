"""The dev issuer over real HTTP, driven by python-keycloak and by a browser-like client."""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from jwcrypto import jwk
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakAuthenticationError, KeycloakError, KeycloakPostError

from auth.dev_issuer.app import create_issuer_app, register_client_key
from auth.dev_issuer.errors import DevIssuerRefused
from auth.dev_issuer.realm import load_realm
from auth.dev_issuer.service import token_commands
from hub.devstack import token_help
from hub.settings import Settings
from tests.auth.conftest import REALM, decode_unverified, free_port, issuer_settings, sign

WEB_CALLBACK = "http://127.0.0.1:8000/callback"


def openid(base: str, client_id: str, secret: str | None = None) -> KeycloakOpenID:
    """A python-keycloak client of the dev issuer, as an application would build it."""
    return KeycloakOpenID(
        server_url=f"{base}/", realm_name=REALM, client_id=client_id, client_secret_key=secret
    )


def challenge_of(verifier: str) -> str:
    """RFC 7636 S256, computed independently of the issuer's code."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


# -- python-keycloak against the dev issuer ---------------------------------------------


def test_well_known_matches_keycloaks_urls(issuer_base: str, issuer_url: str) -> None:
    document = openid(issuer_base, "waha-cli").well_known()
    endpoints = f"{issuer_url}/protocol/openid-connect"
    assert document["issuer"] == issuer_url
    assert document["token_endpoint"] == f"{endpoints}/token"
    assert document["jwks_uri"] == f"{endpoints}/certs"
    assert document["authorization_endpoint"] == f"{endpoints}/auth"
    assert document["userinfo_endpoint"] == f"{endpoints}/userinfo"
    assert document["end_session_endpoint"] == f"{endpoints}/logout"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert "private_key_jwt" in document["token_endpoint_auth_methods_supported"]


def test_certs_publish_rs256_keys_with_ids(issuer_base: str) -> None:
    client = openid(issuer_base, "waha-cli")
    keys = client.certs()["keys"]
    (only,) = keys
    published = jwk.JWK(**only).export_to_pem().decode()
    assert client.public_key() in published.replace("\n", "")
    assert keys
    for key in keys:
        assert key["kty"] == "RSA"
        assert key["alg"] == "RS256"
        assert key["use"] == "sig"
        assert key["kid"]
        assert "d" not in key  # never the private part


def test_password_grant_gives_keycloak_shaped_tokens(issuer_base: str, issuer_url: str) -> None:
    client = openid(issuer_base, "waha-cli")
    answer = client.token("specialist.derm", "waha-dev")
    assert answer["token_type"] == "Bearer"
    assert answer["expires_in"] == 300
    assert {"access_token", "refresh_token", "id_token", "session_state"} <= answer.keys()
    claims = client.decode_token(answer["access_token"])  # verified against /certs
    assert claims["iss"] == issuer_url
    assert claims["aud"] == "waha-api"
    assert claims["azp"] == "waha-cli"
    assert claims["typ"] == "Bearer"
    assert claims["realm_access"] == {"roles": ["specialist"]}
    assert claims["preferred_username"] == "specialist.derm"
    assert claims["waha_specialty"] == "394582007"
    assert "waha_region" not in claims
    assert claims["exp"] - claims["iat"] == 300
    assert claims["nbf"] <= time.time()
    assert claims["scope"].split() == ["openid", "profile", "email"]
    uuid.UUID(claims["sub"])
    identity = client.decode_token(answer["id_token"])
    assert identity["aud"] == "waha-cli"
    assert identity["typ"] == "ID"
    assert identity["sub"] == claims["sub"]


def test_client_credentials_for_a_unit(issuer_base: str) -> None:
    client = openid(issuer_base, "unit-01", "unit-01-secret")
    answer = client.token(grant_type="client_credentials")
    assert "refresh_token" not in answer
    claims = client.decode_token(answer["access_token"])
    assert claims["preferred_username"] == "service-account-unit-01"
    assert claims["client_id"] == "unit-01"
    assert claims["azp"] == "unit-01"
    assert claims["aud"] == "waha-api"
    assert claims["realm_access"] == {"roles": ["unit"]}
    assert claims["waha_unit"] == "unit-01"
    assert claims["waha_region"] == "marrakech-safi"


def test_unit_secret_by_http_basic(token_url: str) -> None:
    response = httpx.post(
        token_url, data={"grant_type": "client_credentials"}, auth=("unit-02", "unit-02-secret")
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    claims = decode_unverified(response.json()["access_token"])
    assert (claims["waha_unit"], claims["waha_region"]) == ("unit-02", "oriental")


def test_refresh_rotates_and_the_old_refresh_token_dies(issuer_base: str) -> None:
    client = openid(issuer_base, "waha-cli")
    first = client.token("coordinator", "waha-dev")
    second = client.refresh_token(first["refresh_token"])
    claims = client.decode_token(second["access_token"])
    assert claims["waha_region"] == "marrakech-safi"
    assert claims["sid"] == decode_unverified(first["access_token"])["sid"]
    with pytest.raises(KeycloakPostError) as stale:
        client.refresh_token(first["refresh_token"])
    assert stale.value.response_code == 400
    assert b"invalid_grant" in (stale.value.response_body or b"")
    client.refresh_token(second["refresh_token"])


def test_userinfo_and_logout(issuer_base: str) -> None:
    client = openid(issuer_base, "waha-cli")
    answer = client.token("relay", "waha-dev")
    info = client.userinfo(answer["access_token"])
    assert isinstance(info, dict)
    assert info["preferred_username"] == "relay"
    assert info["waha_community"] == "sidi-bouzid"
    assert info["sub"] == decode_unverified(answer["access_token"])["sub"]
    client.logout(answer["refresh_token"])
    with pytest.raises(KeycloakPostError):
        client.refresh_token(answer["refresh_token"])
    with pytest.raises(KeycloakError) as gone:
        client.userinfo(answer["access_token"])
    assert gone.value.response_code == 401


def test_userinfo_needs_a_valid_bearer_token(issuer_url: str) -> None:
    url = f"{issuer_url}/protocol/openid-connect/userinfo"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers={"Authorization": "Bearer not.a.token"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# -- unhappy paths of the token endpoint -------------------------------------------------


def test_bad_password_is_refused(issuer_base: str) -> None:
    with pytest.raises(KeycloakAuthenticationError) as refused:
        openid(issuer_base, "waha-cli").token("admin", "wrong")
    assert refused.value.response_code == 401
    assert b"invalid_grant" in (refused.value.response_body or b"")


def test_unknown_user_is_refused_like_a_bad_password(token_url: str) -> None:
    unknown = httpx.post(
        token_url,
        data={
            "grant_type": "password",
            "client_id": "waha-cli",
            "username": "nobody",
            "password": "waha-dev",
        },
    )
    assert unknown.status_code == 401
    assert unknown.json() == {
        "error": "invalid_grant",
        "error_description": "Invalid user credentials",
    }


def test_service_account_cannot_log_in_with_a_password(token_url: str) -> None:
    response = httpx.post(
        token_url,
        data={
            "grant_type": "password",
            "client_id": "waha-cli",
            "username": "service-account-unit-01",
            "password": "",
        },
    )
    assert response.status_code == 401


def test_bad_secret_is_refused(issuer_base: str) -> None:
    with pytest.raises(KeycloakAuthenticationError) as refused:
        openid(issuer_base, "unit-01", "unit-02-secret").token(grant_type="client_credentials")
    assert refused.value.response_code == 401
    assert b"invalid_client" in (refused.value.response_body or b"")


def test_confidential_client_without_credentials_is_refused(token_url: str) -> None:
    response = httpx.post(
        token_url, data={"grant_type": "client_credentials", "client_id": "unit-01"}
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_unknown_client_is_refused(token_url: str) -> None:
    response = httpx.post(
        token_url,
        data={
            "grant_type": "password",
            "client_id": "nobody",
            "username": "admin",
            "password": "waha-dev",
        },
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("data", "auth", "error"),
    [
        # A public CLI client has no service account.
        (
            {"grant_type": "client_credentials", "client_id": "waha-cli"},
            None,
            "unauthorized_client",
        ),
        # A unit client may not log people in by password.
        (
            {"grant_type": "password", "username": "admin", "password": "waha-dev"},
            ("unit-01", "unit-01-secret"),
            "unauthorized_client",
        ),
        # The web client may only use the code flow.
        (
            {
                "grant_type": "password",
                "client_id": "waha-web",
                "username": "admin",
                "password": "waha-dev",
            },
            None,
            "unauthorized_client",
        ),
        ({"grant_type": "implicit", "client_id": "waha-cli"}, None, "unsupported_grant_type"),
        (
            {
                "grant_type": "password",
                "client_id": "waha-cli",
                "username": "admin",
                "password": "waha-dev",
                "scope": "openid system/*.cruds",
            },
            None,
            "invalid_scope",
        ),
    ],
)
def test_wrong_grant_for_the_client(
    token_url: str, data: dict[str, str], auth: tuple[str, str] | None, error: str
) -> None:
    response = httpx.post(token_url, data=data, auth=auth)
    assert response.status_code == 400
    assert response.json()["error"] == error


def test_audience_only_client_gets_no_tokens(token_url: str) -> None:
    response = httpx.post(
        token_url, data={"grant_type": "client_credentials", "client_id": "waha-api"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


def test_duplicate_parameters_are_refused(token_url: str) -> None:
    body = "grant_type=password&client_id=waha-cli&username=admin&username=relay&password=waha-dev"
    response = httpx.post(
        token_url, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


# -- authorization code + PKCE -----------------------------------------------------------


def start_login(issuer_url: str, **overrides: str) -> httpx.Response:
    """GET the authorization endpoint as a browser would, for waha-web."""
    params = {
        "response_type": "code",
        "client_id": "waha-web",
        "redirect_uri": WEB_CALLBACK,
        "scope": "openid",
        "state": "state-123",
        "nonce": "nonce-456",
    }
    params.update(overrides)
    return httpx.get(f"{issuer_url}/protocol/openid-connect/auth", params=params)


def submit_login(page: httpx.Response, username: str, password: str) -> httpx.Response:
    """Fill in and post the login form found on the page."""
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    login_id = re.search(r'name="login_id" value="([^"]+)"', page.text)
    assert action and login_id, page.text
    return httpx.post(
        html.unescape(action.group(1)),
        data={
            "login_id": html.unescape(login_id.group(1)),
            "username": username,
            "password": password,
        },
    )


def code_flow(issuer_url: str, verifier: str, username: str = "specialist.cardio") -> str:
    """Log in through the form; return the authorization code."""
    page = start_login(
        issuer_url, code_challenge=challenge_of(verifier), code_challenge_method="S256"
    )
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    redirect = submit_login(page, username, "waha-dev")
    assert redirect.status_code == 302
    location = redirect.headers["location"]
    assert location.startswith(WEB_CALLBACK + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["state-123"]
    assert query["iss"] == [issuer_url]
    return query["code"][0]


def exchange(token_url: str, code: str, verifier: str | None) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "client_id": "waha-web",
        "code": code,
        "redirect_uri": WEB_CALLBACK,
    }
    if verifier is not None:
        data["code_verifier"] = verifier
    return httpx.post(token_url, data=data)


def test_code_flow_with_pkce(issuer_url: str, token_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_flow(issuer_url, verifier)
    answer = exchange(token_url, code, verifier)
    assert answer.status_code == 200, answer.text
    claims = decode_unverified(answer.json()["access_token"])
    assert claims["azp"] == "waha-web"
    assert claims["aud"] == "waha-api"
    assert claims["waha_specialty"] == "394579002"
    identity = decode_unverified(answer.json()["id_token"])
    assert identity["nonce"] == "nonce-456"
    # RP-initiated logout returns to the app and ends the session.
    logout = httpx.get(
        f"{issuer_url}/protocol/openid-connect/logout",
        params={
            "id_token_hint": answer.json()["id_token"],
            "post_logout_redirect_uri": "http://127.0.0.1:8000/",
            "state": "bye",
        },
    )
    assert logout.status_code == 302
    assert logout.headers["location"] == "http://127.0.0.1:8000/?state=bye"
    refreshed = httpx.post(
        token_url,
        data={
            "grant_type": "refresh_token",
            "client_id": "waha-web",
            "refresh_token": answer.json()["refresh_token"],
        },
    )
    assert refreshed.status_code == 400


def test_reused_code_is_refused_and_revokes_the_session(issuer_url: str, token_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_flow(issuer_url, verifier)
    first = exchange(token_url, code, verifier)
    assert first.status_code == 200
    again = exchange(token_url, code, verifier)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    refreshed = httpx.post(
        token_url,
        data={
            "grant_type": "refresh_token",
            "client_id": "waha-web",
            "refresh_token": first.json()["refresh_token"],
        },
    )
    assert refreshed.status_code == 400


@pytest.mark.parametrize("sent", ["wrong", None, "short"])
def test_pkce_verifier_mismatch_is_refused(
    issuer_url: str, token_url: str, sent: str | None
) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_flow(issuer_url, verifier)
    other = {"wrong": secrets.token_urlsafe(48), None: None, "short": "abc"}[sent]
    response = exchange(token_url, code, other)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    # The code was burnt by the failed attempt.
    assert exchange(token_url, code, verifier).status_code == 400


def test_code_bound_to_its_redirect_uri(issuer_url: str, token_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    code = code_flow(issuer_url, verifier)
    response = httpx.post(
        token_url,
        data={
            "grant_type": "authorization_code",
            "client_id": "waha-web",
            "code": code,
            "redirect_uri": "http://127.0.0.1:8000/other",
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 400
    assert response.json()["error_description"] == "Incorrect redirect_uri"


def test_public_client_without_pkce_is_sent_back(issuer_url: str) -> None:
    response = start_login(issuer_url)
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == ["invalid_request"]
    assert query["state"] == ["state-123"]


def test_plain_pkce_is_refused(issuer_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    response = start_login(issuer_url, code_challenge=verifier, code_challenge_method="plain")
    assert response.status_code == 302
    assert "error=invalid_request" in response.headers["location"]


def test_unregistered_redirect_uri_is_never_followed(issuer_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    response = start_login(
        issuer_url,
        redirect_uri="https://evil.example/steal",
        code_challenge=challenge_of(verifier),
        code_challenge_method="S256",
    )
    assert response.status_code == 400
    assert "location" not in response.headers
    assert "redirect_uri" in response.text


def test_client_without_code_flow_is_sent_back(issuer_url: str) -> None:
    response = start_login(issuer_url, client_id="waha-cli", redirect_uri=WEB_CALLBACK)
    assert response.status_code == 400  # waha-cli registers no redirect URI at all


def test_wrong_password_on_the_form_shows_an_escaped_error(issuer_url: str) -> None:
    verifier = secrets.token_urlsafe(48)
    page = start_login(
        issuer_url, code_challenge=challenge_of(verifier), code_challenge_method="S256"
    )
    again = submit_login(page, "<script>alert(1)</script>", "nope")
    assert again.status_code == 401
    assert "Invalid username or password." in again.text
    assert "<script>alert(1)</script>" not in again.text
    assert "&lt;script&gt;" in again.text
    # The same pending login still works with the right password.
    assert submit_login(again, "admin", "waha-dev").status_code == 302


def test_unknown_login_id_is_refused(issuer_url: str) -> None:
    response = httpx.post(
        f"{issuer_url}/login-actions/authenticate",
        data={"login_id": "forged", "username": "admin", "password": "waha-dev"},
    )
    assert response.status_code == 400


# -- private_key_jwt ---------------------------------------------------------------------


def assertion(client_id: str, audience: str, key: jwk.JWK, **extra: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
    }
    claims.update(extra)
    return sign(claims, key, kid="vehicle-key-1")


def test_unit_authenticates_with_a_signed_jwt(issuer_data_dir: Path, token_url: str) -> None:
    vehicle = jwk.JWK.generate(kty="RSA", size=2048, kid="vehicle-key-1")
    public = jwk.JWKSet()
    public.add(jwk.JWK(**vehicle.export_public(as_dict=True)))
    register_client_key(
        issuer_settings(issuer_data_dir),
        load_realm(),
        client_id="unit-02",
        jwks_text=public.export(private_keys=False),
    )
    signed = assertion("unit-02", token_url, vehicle)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": signed,
    }
    answer = httpx.post(token_url, data=form)
    assert answer.status_code == 200, answer.text
    assert decode_unverified(answer.json()["access_token"])["waha_unit"] == "unit-02"
    replay = httpx.post(token_url, data=form)
    assert replay.status_code == 401  # an assertion is good once

    stranger = jwk.JWK.generate(kty="RSA", size=2048, kid="vehicle-key-1")
    forged = httpx.post(
        token_url, data={**form, "client_assertion": assertion("unit-02", token_url, stranger)}
    )
    assert forged.status_code == 401
    elsewhere = httpx.post(
        token_url,
        data={
            **form,
            "client_assertion": assertion("unit-02", "https://other.example/token", vehicle),
        },
    )
    assert elsewhere.status_code == 401
    # unit-01 registered no key: no signed-JWT login for it.
    no_key = httpx.post(
        token_url, data={**form, "client_assertion": assertion("unit-01", token_url, vehicle)}
    )
    assert no_key.status_code == 401


def test_registering_a_private_key_is_refused(issuer_data_dir: Path) -> None:
    vehicle = jwk.JWKSet()
    vehicle.add(jwk.JWK.generate(kty="RSA", size=2048))
    with pytest.raises(ValueError, match="public key only"):
        register_client_key(
            issuer_settings(issuer_data_dir),
            load_realm(),
            client_id="unit-01",
            jwks_text=vehicle.export(private_keys=True),
        )
    with pytest.raises(ValueError, match="not a confidential client"):
        register_client_key(
            issuer_settings(issuer_data_dir),
            load_realm(),
            client_id="waha-cli",
            jwks_text=vehicle.export(private_keys=False),
        )


# -- keys, production, dev stack ---------------------------------------------------------


def test_keys_survive_a_restart_and_stay_private(tmp_path: Path) -> None:
    first = create_issuer_app(issuer_settings(tmp_path)).state.issuer.jwks()
    second = create_issuer_app(issuer_settings(tmp_path)).state.issuer.jwks()
    assert first == second
    (key_file,) = (tmp_path / "keys").glob("*.json")
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_refuses_production() -> None:
    settings = Settings(env="production", s3_secret_key="not-the-dev-default")
    with pytest.raises(DevIssuerRefused, match="WAHA_ENV=production"):
        create_issuer_app(settings)


@pytest.mark.slow
def test_uvicorn_refuses_to_serve_it_in_production(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WAHA_ENV": "production",
        "WAHA_S3_SECRET_KEY": "not-the-dev-default",
        "WAHA_DEV_ISSUER_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [
            sys.executable,
            "-m",
            "uvicorn",
            "auth.dev_issuer.app:create_issuer_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "refuses to start with WAHA_ENV=production" in result.stderr
    assert not (tmp_path / "keys").exists()


def test_dev_stack_prints_working_token_commands(issuer_url: str, token_url: str) -> None:
    commands = token_commands(load_realm(), token_url)
    labels = [label.split()[0] for label, _ in commands]
    assert labels == [
        "specialist.derm",
        "specialist.cardio",
        "coordinator",
        "relay",
        "ministry",
        "admin",
        "unit-01",
        "unit-02",
    ]
    printed = token_help(issuer_url, commands, 8000)
    assert all(command in printed for _, command in commands)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    for _, command in commands:
        answer = subprocess.run(  # noqa: S603 - the commands the dev stack prints
            shlex.split(command), capture_output=True, text=True, timeout=30, check=True
        )
        assert '"access_token"' in answer.stdout


@pytest.mark.slow
def test_served_by_uvicorn_and_rotated_by_the_cli(tmp_path: Path) -> None:
    """The documented commands: `uvicorn … --factory` and `waha dev-issuer rotate-keys`."""
    env = {**os.environ, "WAHA_ENV": "dev", "WAHA_DEV_ISSUER_DATA_DIR": str(tmp_path)}
    port = free_port()
    base = f"http://127.0.0.1:{port}/realms/{REALM}"
    server = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
        [
            sys.executable,
            "-m",
            "uvicorn",
            "auth.dev_issuer.app:create_issuer_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/.well-known/openid-configuration").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dev issuer did not start"
            time.sleep(0.1)
        (before,) = httpx.get(f"{base}/protocol/openid-connect/certs").json()["keys"]
        waha = Path(sys.executable).parent / "waha"
        rotated = subprocess.run(  # noqa: S603 - the project's own CLI
            [str(waha), "dev-issuer", "rotate-keys"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert "now signs with" in rotated.stdout
        kids = [
            key["kid"] for key in httpx.get(f"{base}/protocol/openid-connect/certs").json()["keys"]
        ]
        assert len(kids) == 2
        assert kids[1] == before["kid"]  # newest first; the old one stays published
        token = httpx.post(
            f"{base}/protocol/openid-connect/token",
            data={"grant_type": "client_credentials"},
            auth=("unit-01", "unit-01-secret"),
        ).json()["access_token"]
        header = token.split(".")[0]
        assert kids[0] in base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)).decode()
    finally:
        server.terminate()
        server.wait(timeout=20)
