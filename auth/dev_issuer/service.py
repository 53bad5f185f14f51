"""The dev issuer's rules: client authentication, grants, sessions and token contents.

It mirrors what Keycloak does with the same realm file, closely enough that
the API cannot tell the two apart: the same URLs, the same claim names and
shapes (driven by the clients' protocol mappers), the same error codes. State
(logins in progress, codes, sessions) lives in memory: restarting the dev
issuer logs everybody out, as restarting a Keycloak with an in-memory cache would.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

from jwcrypto import jwk, jws, jwt
from jwcrypto.common import JWException, base64url_encode

from auth.dev_issuer.errors import OAuthError
from auth.dev_issuer.keys import KeyStore
from auth.dev_issuer.realm import Client, ProtocolMapper, Realm, User

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ["RS256", "ES256", "PS256"]
# Scopes Keycloak lists in the token's `scope` claim (include.in.token.scope);
# roles, basic, acr and web-origins shape claims but are not listed.
LISTED_SCOPES = ("profile", "email")
# RFC 7636 §4.1: 43 to 128 characters from the unreserved set.
PKCE_VALUE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
LOGIN_LIFESPAN_SECONDS = 1800


def s256_challenge(verifier: str) -> str:
    """Return the RFC 7636 S256 code challenge of a verifier."""
    return str(base64url_encode(hashlib.sha256(verifier.encode("ascii")).digest()))


@dataclass(slots=True)
class PendingLogin:
    """An authorization request waiting for the user to log in."""

    login_id: str
    client_id: str
    redirect_uri: str
    state: str | None
    nonce: str | None
    scope: str
    code_challenge: str | None
    expires_at: float


@dataclass(slots=True)
class AuthorizationCode:
    """A one-time code handed to the client's redirect URI."""

    client_id: str
    redirect_uri: str
    session_id: str
    scope: str
    nonce: str | None
    code_challenge: str | None
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class UserSession:
    """A logged-in user at one client; refresh tokens are tied to it."""

    session_id: str
    username: str
    client_id: str
    auth_time: int
    last_used: float
    refresh_token_id: str | None = None


@dataclass(slots=True)
class LoginResult:
    """Where to send the browser after a successful login."""

    redirect_to: str


@dataclass(slots=True)
class IssuerState:
    """Everything the issuer remembers between requests."""

    logins: dict[str, PendingLogin] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    sessions: dict[str, UserSession] = field(default_factory=dict)
    used_assertions: dict[str, float] = field(default_factory=dict)


class LoginFailed(Exception):
    """The login form was sent with wrong credentials."""


class LoginExpired(Exception):
    """The login form refers to no pending authorization request."""


class DevIssuer:
    """Issue Keycloak-shaped tokens for the clients and users of one realm."""

    def __init__(
        self,
        realm: Realm,
        keys: KeyStore,
        *,
        client_keys_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.realm = realm
        self.keys = keys
        self.client_keys_dir = client_keys_dir
        self._clock = clock
        self._state = IssuerState()
        self._lock = threading.Lock()
        self._users_by_subject = {user.subject: user for user in realm.users.values()}

    # -- documents -----------------------------------------------------------------------

    def discovery(self, issuer: str) -> dict[str, Any]:
        """Return the OpenID Provider metadata, with Keycloak's endpoint paths."""
        endpoints = f"{issuer}/protocol/openid-connect"
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{endpoints}/auth",
            "token_endpoint": f"{endpoints}/token",
            "userinfo_endpoint": f"{endpoints}/userinfo",
            "end_session_endpoint": f"{endpoints}/logout",
            "jwks_uri": f"{endpoints}/certs",
            "grant_types_supported": [
                "authorization_code",
                "client_credentials",
                "password",
                "refresh_token",
            ],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "userinfo_signing_alg_values_supported": ["none"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", *LISTED_SCOPES, "offline_access"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "azp",
                "preferred_username",
                "email",
                "given_name",
                "family_name",
                "realm_access",
                "waha_unit",
                "waha_region",
                "waha_community",
                "waha_specialty",
            ],
            "authorization_response_iss_parameter_supported": True,
            "backchannel_logout_supported": False,
            "frontchannel_logout_supported": False,
        }

    def public_key(self) -> str:
        """Return the active public key as Keycloak's realm endpoint does (base64 DER)."""
        pem = self.keys.active().key.export_to_pem().decode("ascii")
        return "".join(line for line in pem.splitlines() if not line.startswith("-----"))

    def jwks(self) -> dict[str, Any]:
        """Return the public keys of every key whose tokens may still be alive."""
        return {"keys": [key.public_jwk() for key in self.keys.published()]}

    # -- the token endpoint --------------------------------------------------------------

    def token(
        self, *, issuer: str, form: Mapping[str, str], authorization: str | None
    ) -> dict[str, Any]:
        """Answer a token request (RFC 6749 §4): authenticate the client, run its grant."""
        token_endpoint = f"{issuer}/protocol/openid-connect/token"
        client = self.authenticate_client(
            form=form, authorization=authorization, audiences=[token_endpoint, issuer]
        )
        grant_type = form.get("grant_type", "")
        with self._lock:
            if grant_type == "client_credentials":
                return self._client_credentials(issuer, client, form)
            if grant_type == "password":
                return self._password(issuer, client, form)
            if grant_type == "authorization_code":
                return self._authorization_code(issuer, client, form)
            if grant_type == "refresh_token":
                return self._refresh(issuer, client, form)
        raise OAuthError("unsupported_grant_type", "Unsupported grant_type")

    def authenticate_client(
        self, *, form: Mapping[str, str], authorization: str | None, audiences: list[str]
    ) -> Client:
        """Identify the client: secret (basic or post), private_key_jwt, or a public id."""
        basic = _basic_credentials(authorization)
        assertion_type = form.get("client_assertion_type")
        methods = sum((basic is not None, "client_secret" in form, assertion_type is not None))
        if methods > 1:
            raise OAuthError("invalid_request", "Use exactly one client authentication method")
        if assertion_type is not None:
            return self._client_from_assertion(form, assertion_type, audiences)
        client_id, secret = basic if basic else (form.get("client_id"), form.get("client_secret"))
        client = self._client(client_id)
        if basic and form.get("client_id") not in (None, client.client_id):
            raise OAuthError("invalid_request", "client_id differs from the authenticated client")
        if client.bearer_only:
            raise OAuthError("unauthorized_client", "Bearer-only clients cannot obtain tokens")
        if client.public:
            return client
        expected = client.secret or ""
        # Constant-time comparison: a timing difference would leak the secret.
        if not secret or not expected or not hmac.compare_digest(secret, expected):
            raise _invalid_client()
        return client

    def _client(self, client_id: str | None) -> Client:
        client = self.realm.clients.get(client_id or "")
        if client is None or not client.enabled:
            raise _invalid_client()
        return client

    def _client_from_assertion(
        self, form: Mapping[str, str], assertion_type: str, audiences: list[str]
    ) -> Client:
        """Authenticate a client by a JWT it signed with its registered key (RFC 7523)."""
        if assertion_type != JWT_BEARER_ASSERTION:
            raise OAuthError("invalid_client", "Unsupported client_assertion_type", status=401)
        assertion = form.get("client_assertion", "")
        try:
            envelope = jws.JWS()
            envelope.deserialize(assertion)
            unverified = json.loads(envelope.objects["payload"])
        except (JWException, ValueError, KeyError, TypeError) as error:
            raise OAuthError("invalid_client", "Malformed client assertion", status=401) from error
        client_id = unverified.get("sub") if isinstance(unverified, dict) else None
        client = self._client(client_id if isinstance(client_id, str) else None)
        if form.get("client_id") not in (None, client.client_id) or client.public:
            raise _invalid_client()
        keys = self._registered_client_keys(client)
        if keys is None:
            raise OAuthError("invalid_client", "No key registered for the client", status=401)
        try:
            verified = jwt.JWT(
                jwt=assertion,
                key=keys,
                algs=ASSERTION_ALGORITHMS,
                check_claims={
                    "iss": client.client_id,
                    "sub": client.client_id,
                    "aud": audiences,
                    "exp": None,
                    "jti": None,
                },
            )
            claims = json.loads(verified.claims)
        except (JWException, ValueError) as error:
            raise OAuthError("invalid_client", "Client assertion not valid", status=401) from error
        now = self._clock()
        with self._lock:
            self._state.used_assertions = {
                jti: expiry for jti, expiry in self._state.used_assertions.items() if expiry > now
            }
            key = f"{client.client_id}:{claims['jti']}"
            # RFC 7523 §3: an assertion is good for one use.
            if key in self._state.used_assertions:
                raise OAuthError("invalid_client", "Client assertion already used", status=401)
            self._state.used_assertions[key] = float(claims["exp"]) + 60
        return client

    def _registered_client_keys(self, client: Client) -> jwk.JWKSet | None:
        """Return the client's public keys: the realm's `jwks.string`, or the dev data folder."""
        text = None
        if client.attributes.get("use.jwks.string") == "true":
            text = client.attributes.get("jwks.string")
        registered = self.client_keys_dir / f"{client.client_id}.json"
        if text is None and registered.is_file():
            text = registered.read_text(encoding="utf-8")
        if not text:
            return None
        return jwk.JWKSet.from_json(text)

    def _client_credentials(
        self, issuer: str, client: Client, form: Mapping[str, str]
    ) -> dict[str, Any]:
        if client.public:
            raise OAuthError(
                "unauthorized_client", "Public client not allowed to retrieve service account"
            )
        account = self.realm.service_account(client.client_id)
        if not client.service_accounts or account is None:
            raise OAuthError(
                "unauthorized_client", "Client not enabled to retrieve service account"
            )
        scope = self._granted_scope(client, form.get("scope", ""))
        # As Keycloak (≥ 12) by default: no refresh token and no user session
        # for client_credentials; the client simply asks again.
        access = self._access_token(
            issuer, client, account, scope, session_id=None, notes={"client_id": client.client_id}
        )
        return {
            "access_token": access,
            "expires_in": self.realm.access_token_lifespan,
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": scope,
        }

    def _password(self, issuer: str, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        if not client.direct_access_grants:
            raise OAuthError("unauthorized_client", "Client not allowed for direct access grants")
        user = self._check_password(form.get("username", ""), form.get("password", ""))
        if user is None:
            raise OAuthError("invalid_grant", "Invalid user credentials", status=401)
        scope = self._granted_scope(client, form.get("scope", ""))
        session = self._new_session(user, client)
        return self._user_tokens(issuer, client, user, session, scope, nonce=None)

    def _authorization_code(
        self, issuer: str, client: Client, form: Mapping[str, str]
    ) -> dict[str, Any]:
        if not client.standard_flow:
            raise OAuthError("unauthorized_client", "Client not allowed for the code flow")
        now = self._clock()
        self._state.codes = {
            code: grant
            for code, grant in self._state.codes.items()
            if grant.expires_at > now - self.realm.access_code_lifespan
        }
        grant = self._state.codes.get(form.get("code", ""))
        if grant is None or grant.expires_at <= now or grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "Code not valid")
        if grant.used:
            # RFC 6749 §4.1.2: a code used twice may have been stolen; revoke
            # what it gave, so the first holder's refresh token dies as well.
            self._state.sessions.pop(grant.session_id, None)
            raise OAuthError("invalid_grant", "Code not valid")
        grant.used = True
        if form.get("redirect_uri") != grant.redirect_uri:
            raise OAuthError("invalid_grant", "Incorrect redirect_uri")
        verifier = form.get("code_verifier")
        if grant.code_challenge is not None:
            if not verifier:
                raise OAuthError("invalid_grant", "PKCE code verifier not specified")
            if not PKCE_VALUE.match(verifier):
                raise OAuthError("invalid_grant", "PKCE invalid code verifier")
            if not hmac.compare_digest(s256_challenge(verifier), grant.code_challenge):
                raise OAuthError("invalid_grant", "PKCE verification failed")
        elif verifier:
            raise OAuthError("invalid_grant", "PKCE code verifier given without a challenge")
        session = self._state.sessions.get(grant.session_id)
        if session is None:
            raise OAuthError("invalid_grant", "Session not active")
        user = self.realm.users[session.username]
        return self._user_tokens(issuer, client, user, session, grant.scope, nonce=grant.nonce)

    def _refresh(self, issuer: str, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        claims = self._verify_own(
            form.get("refresh_token", ""), issuer=issuer, expected_typ="Refresh"
        )
        if claims is None or claims.get("azp") != client.client_id:
            raise OAuthError("invalid_grant", "Invalid refresh token")
        session = self._state.sessions.get(str(claims.get("sid")))
        if session is None or session.client_id != client.client_id:
            raise OAuthError("invalid_grant", "Session not active")
        # The realm revokes refresh tokens on use: only the newest one works.
        if claims.get("jti") != session.refresh_token_id:
            raise OAuthError("invalid_grant", "Stale token")
        user = self.realm.users.get(session.username)
        if user is None or not user.enabled:
            raise OAuthError("invalid_grant", "User disabled")
        return self._user_tokens(
            issuer, client, user, session, str(claims.get("scope", "")), nonce=None
        )

    # -- browser login -------------------------------------------------------------------

    def start_login(self, params: Mapping[str, str]) -> PendingLogin:
        """Check an authorization request (RFC 6749 §4.1.1, RFC 7636) and remember it.

        Raises OAuthError before the redirect URI is trusted (shown to the user),
        and RedirectError after (sent back to the client).
        """
        client = self.realm.clients.get(params.get("client_id", ""))
        if client is None or not client.enabled or client.bearer_only:
            raise OAuthError("invalid_client", "Client not found")
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri or not client.accepts_redirect(redirect_uri):
            raise OAuthError("invalid_request", "Invalid parameter: redirect_uri")
        state = params.get("state")

        def refuse(error: str, description: str) -> RedirectError:
            return RedirectError(
                _with_query(redirect_uri, error=error, error_description=description, state=state)
            )

        if params.get("response_type") != "code":
            raise refuse("unsupported_response_type", "Only the code flow is supported")
        if not client.standard_flow:
            raise refuse("unauthorized_client", "Client is not allowed to initiate browser login")
        challenge = params.get("code_challenge")
        method = params.get("code_challenge_method")
        if method is not None and method != "S256":
            raise refuse("invalid_request", "Invalid parameter: code_challenge_method")
        if challenge is None and (client.requires_pkce or method is not None):
            raise refuse("invalid_request", "Missing parameter: code_challenge")
        if challenge is not None and (method != "S256" or not PKCE_VALUE.match(challenge)):
            raise refuse("invalid_request", "Invalid parameter: code_challenge")
        try:
            scope = self._granted_scope(client, params.get("scope", ""))
        except OAuthError as error:
            raise refuse(error.error, error.description) from error
        login = PendingLogin(
            login_id=secrets.token_urlsafe(32),
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            state=state,
            nonce=params.get("nonce"),
            scope=scope,
            code_challenge=challenge,
            expires_at=self._clock() + LOGIN_LIFESPAN_SECONDS,
        )
        with self._lock:
            now = self._clock()
            self._state.logins = {
                key: value for key, value in self._state.logins.items() if value.expires_at > now
            }
            self._state.logins[login.login_id] = login
        return login

    def finish_login(
        self, *, issuer: str, login_id: str, username: str, password: str
    ) -> LoginResult:
        """Check the login form; on success issue a code and say where to redirect."""
        with self._lock:
            login = self._state.logins.get(login_id)
            if login is None or login.expires_at <= self._clock():
                raise LoginExpired
            user = self._check_password(username, password)
            if user is None:
                raise LoginFailed
            del self._state.logins[login_id]
            client = self.realm.clients[login.client_id]
            session = self._new_session(user, client)
            code = secrets.token_urlsafe(32)
            self._state.codes[code] = AuthorizationCode(
                client_id=client.client_id,
                redirect_uri=login.redirect_uri,
                session_id=session.session_id,
                scope=login.scope,
                nonce=login.nonce,
                code_challenge=login.code_challenge,
                expires_at=self._clock() + self.realm.access_code_lifespan,
            )
        return LoginResult(
            _with_query(
                login.redirect_uri,
                code=code,
                state=login.state,
                session_state=session.session_id,
                iss=issuer,
            )
        )

    def pending_login(self, login_id: str) -> PendingLogin | None:
        """Return a login in progress by id."""
        login = self._state.logins.get(login_id)
        return login if login is not None and login.expires_at > self._clock() else None

    # -- logout and userinfo -------------------------------------------------------------

    def logout_with_refresh_token(
        self, *, issuer: str, form: Mapping[str, str], authorization: str | None
    ) -> None:
        """End the session a refresh token belongs to (python-keycloak's `logout`)."""
        token_endpoint = f"{issuer}/protocol/openid-connect/token"
        client = self.authenticate_client(
            form=form, authorization=authorization, audiences=[token_endpoint, issuer]
        )
        claims = self._verify_own(form.get("refresh_token", ""), issuer=issuer, expected_typ=None)
        if claims is None or claims.get("azp") != client.client_id:
            raise OAuthError("invalid_grant", "Invalid refresh token")
        with self._lock:
            self._state.sessions.pop(str(claims.get("sid")), None)

    def logout_from_browser(self, *, issuer: str, params: Mapping[str, str]) -> str | None:
        """End the session an ID token names; return where to redirect, if anywhere."""
        claims = None
        hint = params.get("id_token_hint")
        if hint:
            claims = self._verify_own(hint, issuer=issuer, expected_typ="ID", check_expiry=False)
            if claims is None:
                raise OAuthError("invalid_request", "Invalid id_token_hint")
            with self._lock:
                self._state.sessions.pop(str(claims.get("sid")), None)
        redirect = params.get("post_logout_redirect_uri")
        if not redirect:
            return None
        client_id = params.get("client_id") or (claims or {}).get("azp")
        client = self.realm.clients.get(str(client_id))
        allowed = (
            client is not None
            and client.attributes.get("post.logout.redirect.uris") == "+"
            and client.accepts_redirect(redirect)
        )
        if not allowed:
            raise OAuthError("invalid_request", "Invalid redirect uri")
        return _with_query(redirect, state=params.get("state"))

    def userinfo(self, *, issuer: str, access_token: str) -> dict[str, Any]:
        """Return the claims of the user an access token speaks for."""
        claims = self._verify_own(access_token, issuer=issuer, expected_typ="Bearer")
        if claims is None:
            raise OAuthError("invalid_token", "Token verification failed", status=401)
        session_id = claims.get("sid")
        if session_id is not None and session_id not in self._state.sessions:
            raise OAuthError("invalid_token", "User session not found", status=401)
        user = self._users_by_subject.get(str(claims.get("sub")))
        client = self.realm.clients.get(str(claims.get("azp")))
        if user is None or client is None:
            raise OAuthError("invalid_token", "User not found", status=401)
        notes = {"client_id": client.client_id} if user.service_account_of else {}
        info = {"sub": user.subject}
        info.update(_mapped_claims(client.mappers, "userinfo", user, notes))
        return info

    # -- helpers -------------------------------------------------------------------------

    def _check_password(self, username: str, password: str) -> User | None:
        user = self.realm.users.get(username)
        expected = user.password if user is not None else None
        # Compare even for unknown users, so timing does not reveal who exists.
        matches = hmac.compare_digest(
            password.encode(), (expected or secrets.token_hex(16)).encode()
        )
        if user is None or expected is None or not matches or not user.enabled:
            return None
        return user

    def _new_session(self, user: User, client: Client) -> UserSession:
        now = self._clock()
        # Idle sessions go, so a long benchmark fetching tokens does not grow memory.
        idle_limit = now - self.realm.session_idle_timeout
        self._state.sessions = {
            key: value
            for key, value in self._state.sessions.items()
            if value.last_used > idle_limit
        }
        session = UserSession(
            session_id=str(uuid.uuid4()),
            username=user.username,
            client_id=client.client_id,
            auth_time=int(now),
            last_used=now,
        )
        self._state.sessions[session.session_id] = session
        return session

    def _granted_scope(self, client: Client, requested: str) -> str:
        """Return the token's scope: openid if asked, default scopes, asked-for optional ones."""
        asked = requested.split()
        known = {"openid", *client.default_scopes, *client.optional_scopes}
        unknown = [scope for scope in asked if scope not in known]
        if unknown:
            raise OAuthError("invalid_scope", "Invalid scopes: " + " ".join(unknown))
        granted = ["openid"] if "openid" in asked else []
        granted += [scope for scope in client.default_scopes if scope in LISTED_SCOPES]
        granted += [scope for scope in asked if scope in client.optional_scopes]
        return " ".join(dict.fromkeys(granted))

    def _user_tokens(
        self,
        issuer: str,
        client: Client,
        user: User,
        session: UserSession,
        scope: str,
        *,
        nonce: str | None,
    ) -> dict[str, Any]:
        now = int(self._clock())
        session.last_used = now
        access = self._access_token(issuer, client, user, scope, session.session_id, notes={})
        refresh_id = str(uuid.uuid4())
        session.refresh_token_id = refresh_id
        refresh = self._sign(
            {
                "exp": now + self.realm.session_idle_timeout,
                "iat": now,
                "jti": refresh_id,
                "iss": issuer,
                "aud": issuer,
                "sub": user.subject,
                "typ": "Refresh",
                "azp": client.client_id,
                "sid": session.session_id,
                "scope": scope,
            }
        )
        answer: dict[str, Any] = {
            "access_token": access,
            "expires_in": self.realm.access_token_lifespan,
            "refresh_expires_in": self.realm.session_idle_timeout,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "session_state": session.session_id,
            "scope": scope,
        }
        if "openid" in scope.split():
            id_claims: dict[str, Any] = {
                "exp": now + self.realm.access_token_lifespan,
                "iat": now,
                "auth_time": session.auth_time,
                "jti": str(uuid.uuid4()),
                "iss": issuer,
                "aud": client.client_id,
                "sub": user.subject,
                "typ": "ID",
                "azp": client.client_id,
                "sid": session.session_id,
            }
            if nonce:
                id_claims["nonce"] = nonce
            id_claims.update(_mapped_claims(client.mappers, "id", user, {}))
            answer["id_token"] = self._sign(id_claims)
        return answer

    def _access_token(
        self,
        issuer: str,
        client: Client,
        user: User,
        scope: str,
        session_id: str | None,
        *,
        notes: dict[str, str],
    ) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "exp": now + self.realm.access_token_lifespan,
            "iat": now,
            "nbf": now,
            "jti": str(uuid.uuid4()),
            "iss": issuer,
            "sub": user.subject,
            "typ": "Bearer",
            "azp": client.client_id,
            "acr": "1",
            "scope": scope,
        }
        if session_id is not None:
            claims["sid"] = session_id
        claims.update(_mapped_claims(client.mappers, "access", user, notes))
        return self._sign(claims)

    def _sign(self, claims: dict[str, Any]) -> str:
        key = self.keys.active()
        token = jwt.JWT(header={"alg": "RS256", "typ": "JWT", "kid": key.kid}, claims=claims)
        token.make_signed_token(key.key)
        return str(token.serialize())

    def _verify_own(
        self,
        token: str,
        *,
        issuer: str,
        expected_typ: str | None,
        check_expiry: bool = True,
    ) -> dict[str, Any] | None:
        """Return the claims of a token this issuer signed, or None if it is not one."""
        keys = jwk.JWKSet()
        for signing_key in self.keys.published():
            keys.add(signing_key.key)
        expected: dict[str, Any] = {"iss": issuer}
        if check_expiry:
            expected["exp"] = None
        try:
            verified = jwt.JWT(jwt=token, key=keys, algs=["RS256"], check_claims=expected)
            claims = json.loads(verified.claims)
        except (JWException, ValueError, TypeError):
            return None
        if not isinstance(claims, dict):
            return None
        if expected_typ is not None and claims.get("typ") != expected_typ:
            return None
        return claims


class RedirectError(Exception):
    """An authorization request error answered by redirecting to the client."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def _invalid_client() -> OAuthError:
    return OAuthError("invalid_client", "Invalid client or Invalid client credentials", status=401)


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """Decode `Authorization: Basic` client credentials (RFC 6749 §2.3.1: form-encoded)."""
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as error:
        raise OAuthError("invalid_client", "Malformed basic credentials", status=401) from error
    client_id, separator, secret = decoded.partition(":")
    if not separator:
        raise OAuthError("invalid_client", "Malformed basic credentials", status=401)
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))


def _with_query(uri: str, **params: str | None) -> str:
    parts = urlsplit(uri)
    extra = urlencode({key: value for key, value in params.items() if value is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _set_claim(claims: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a claim whose name may be nested with dots (`realm_access.roles`)."""
    *parents, leaf = dotted.split(".")
    target = claims
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = value


def _mapped_claims(
    mappers: tuple[ProtocolMapper, ...], token: str, user: User, notes: dict[str, str]
) -> dict[str, Any]:
    """Apply a client's protocol mappers of the kinds the realm file uses, as Keycloak does."""
    claims: dict[str, Any] = {}
    audiences: list[str] = []
    for mapper in mappers:
        if mapper.kind == "oidc-audience-mapper":
            if mapper.applies_to(token) and mapper.config.get("included.client.audience"):
                audiences.append(mapper.config["included.client.audience"])
            continue
        if mapper.kind == "oidc-sub-mapper" or not mapper.applies_to(token):
            continue  # `sub` is always set by the issuer itself
        claim = mapper.config.get("claim.name", "")
        value: Any = None
        if mapper.kind == "oidc-usermodel-property-mapper":
            value = user.property(mapper.config.get("user.attribute", ""))
        elif mapper.kind == "oidc-usermodel-attribute-mapper":
            values = user.attributes.get(mapper.config.get("user.attribute", ""), [])
            value = (
                values if mapper.config.get("multivalued") == "true" else next(iter(values), None)
            )
        elif mapper.kind == "oidc-usermodel-realm-role-mapper":
            value = list(user.roles)
        elif mapper.kind == "oidc-usersessionmodel-note-mapper":
            value = notes.get(mapper.config.get("user.session.note", ""))
        if claim and value not in (None, [], ""):
            _set_claim(claims, claim, value)
    if audiences:
        # Keycloak writes a single audience as a string, several as a list.
        claims["aud"] = audiences[0] if len(audiences) == 1 else audiences
    return claims


def token_commands(realm: Realm, token_url: str) -> list[tuple[str, str]]:
    """Return, per demo user and unit client, a curl command that gets an access token."""
    commands: list[tuple[str, str]] = []
    cli = realm.clients.get("waha-cli")
    for user in realm.users.values():
        if user.password is None or user.service_account_of or cli is None:
            continue
        roles = ",".join(user.roles)
        commands.append(
            (
                f"{user.username} ({roles})",
                f"curl -s {token_url} -d grant_type=password -d client_id={cli.client_id} "
                f"-d username={user.username} -d password={user.password}",
            )
        )
    for client in realm.clients.values():
        if client.service_accounts and client.secret and not client.public:
            commands.append(
                (
                    f"{client.client_id} (unit)",
                    f"curl -s {token_url} -u {client.client_id}:{client.secret} "
                    "-d grant_type=client_credentials",
                )
            )
    return commands
