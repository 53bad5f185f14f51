"""Read the Keycloak realm export (platform/keycloak/waha-realm.json) the dev issuer serves."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REALM_FILE = Path(__file__).resolve().parents[2] / "platform" / "keycloak" / "waha-realm.json"


@dataclass(frozen=True, slots=True)
class ProtocolMapper:
    """One OIDC protocol mapper of a client: its Keycloak type and config."""

    name: str
    kind: str
    config: dict[str, str]

    def applies_to(self, token: str) -> bool:
        """Return whether this mapper writes into `access`, `id` or `userinfo` tokens."""
        key = {"access": "access.token.claim", "id": "id.token.claim"}.get(
            token, "userinfo.token.claim"
        )
        return self.config.get(key, "false") == "true"


@dataclass(frozen=True, slots=True)
class Client:
    """A realm client as the dev issuer needs it."""

    client_id: str
    enabled: bool
    public: bool
    bearer_only: bool
    secret: str | None
    standard_flow: bool
    direct_access_grants: bool
    service_accounts: bool
    redirect_uris: tuple[str, ...]
    attributes: dict[str, str]
    mappers: tuple[ProtocolMapper, ...]
    default_scopes: tuple[str, ...]
    optional_scopes: tuple[str, ...]

    @property
    def requires_pkce(self) -> bool:
        """Return whether authorization requests must carry an S256 code challenge."""
        return self.attributes.get("pkce.code.challenge.method") == "S256"

    def accepts_redirect(self, uri: str) -> bool:
        """Match a redirect URI against the registered ones, as Keycloak does (`*` = prefix)."""
        for pattern in self.redirect_uris:
            if pattern.endswith("*"):
                if uri.startswith(pattern[:-1]):
                    return True
            elif uri == pattern:
                return True
        return False


@dataclass(frozen=True, slots=True)
class User:
    """A realm user (person or service account)."""

    username: str
    enabled: bool
    password: str | None
    email: str | None
    first_name: str | None
    last_name: str | None
    roles: tuple[str, ...]
    attributes: dict[str, list[str]]
    service_account_of: str | None

    @property
    def subject(self) -> str:
        """Return the stable `sub` of this user (Keycloak uses a UUID; so do we)."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"waha-dev-issuer:user:{self.username}"))

    def property(self, name: str) -> str | None:
        """Return a built-in user property by its Keycloak name."""
        return {
            "username": self.username,
            "email": self.email,
            "firstName": self.first_name,
            "lastName": self.last_name,
        }.get(name)


@dataclass(frozen=True, slots=True)
class Realm:
    """The parts of a realm export the dev issuer serves."""

    name: str
    access_token_lifespan: int
    access_code_lifespan: int
    session_idle_timeout: int
    roles: frozenset[str]
    clients: dict[str, Client]
    users: dict[str, User]
    declared_attributes: frozenset[str] = field(default_factory=frozenset)

    def service_account(self, client_id: str) -> User | None:
        """Return the service-account user of a client, if it has one."""
        for user in self.users.values():
            if user.service_account_of == client_id:
                return user
        return None


def _mapper(raw: dict[str, Any]) -> ProtocolMapper:
    return ProtocolMapper(
        name=str(raw["name"]),
        kind=str(raw["protocolMapper"]),
        config={str(key): str(value) for key, value in (raw.get("config") or {}).items()},
    )


def _client(raw: dict[str, Any]) -> Client:
    return Client(
        client_id=str(raw["clientId"]),
        enabled=bool(raw.get("enabled", True)),
        public=bool(raw.get("publicClient", False)),
        bearer_only=bool(raw.get("bearerOnly", False)),
        secret=raw.get("secret"),
        standard_flow=bool(raw.get("standardFlowEnabled", True)),
        direct_access_grants=bool(raw.get("directAccessGrantsEnabled", False)),
        service_accounts=bool(raw.get("serviceAccountsEnabled", False)),
        redirect_uris=tuple(raw.get("redirectUris") or ()),
        attributes={str(k): str(v) for k, v in (raw.get("attributes") or {}).items()},
        mappers=tuple(_mapper(item) for item in raw.get("protocolMappers") or ()),
        default_scopes=tuple(raw.get("defaultClientScopes") or ()),
        optional_scopes=tuple(raw.get("optionalClientScopes") or ()),
    )


def _user(raw: dict[str, Any], declared: frozenset[str]) -> User:
    passwords = [
        str(item["value"])
        for item in raw.get("credentials") or ()
        if item.get("type") == "password" and "value" in item
    ]
    # Keycloak ≥ 24 drops attributes the user profile does not declare; so do we.
    attributes = {
        str(name): [str(value) for value in values]
        for name, values in (raw.get("attributes") or {}).items()
        if name in declared
    }
    return User(
        username=str(raw["username"]),
        enabled=bool(raw.get("enabled", True)),
        password=passwords[0] if passwords else None,
        email=raw.get("email"),
        first_name=raw.get("firstName"),
        last_name=raw.get("lastName"),
        roles=tuple(raw.get("realmRoles") or ()),
        attributes=attributes,
        service_account_of=raw.get("serviceAccountClientId"),
    )


def declared_profile_attributes(raw_realm: dict[str, Any]) -> frozenset[str]:
    """Return the attribute names the realm's declarative user profile declares."""
    providers = (raw_realm.get("components") or {}).get(
        "org.keycloak.userprofile.UserProfileProvider", []
    )
    names: set[str] = set()
    for provider in providers:
        for text in (provider.get("config") or {}).get("kc.user.profile.config", []):
            names.update(str(item["name"]) for item in json.loads(text).get("attributes", []))
    return frozenset(names)


def parse_realm(raw: dict[str, Any]) -> Realm:
    """Build a Realm from a parsed realm export."""
    declared = declared_profile_attributes(raw)
    return Realm(
        name=str(raw["realm"]),
        access_token_lifespan=int(raw.get("accessTokenLifespan", 300)),
        access_code_lifespan=int(raw.get("accessCodeLifespan", 60)),
        session_idle_timeout=int(raw.get("ssoSessionIdleTimeout", 1800)),
        roles=frozenset(str(role["name"]) for role in (raw.get("roles") or {}).get("realm", [])),
        clients={client.client_id: client for client in map(_client, raw.get("clients") or ())},
        users={user.username: user for user in (_user(item, declared) for item in raw["users"])},
        declared_attributes=declared,
    )


def load_realm(path: Path = REALM_FILE) -> Realm:
    """Read and parse a realm export file."""
    return parse_realm(json.loads(path.read_text(encoding="utf-8")))
