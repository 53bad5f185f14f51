"""The realm file has the shape Keycloak 26 imports, and says what DESIGN.md says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from auth.dev_issuer.realm import REALM_FILE, declared_profile_attributes, load_realm

WAHA_CLAIMS = ("waha_unit", "waha_region", "waha_community", "waha_specialty")
TOKEN_CLIENTS = ("waha-web", "waha-cli", "unit-01", "unit-02")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The realm export as JSON."""
    data: dict[str, Any] = json.loads(REALM_FILE.read_text(encoding="utf-8"))
    return data


def clients(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {client["clientId"]: client for client in raw["clients"]}


def users(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {user["username"]: user for user in raw["users"]}


def test_realm_and_roles(raw: dict[str, Any]) -> None:
    assert raw["realm"] == "waha"
    assert raw["enabled"] is True
    assert raw["accessTokenLifespan"] == 300
    assert raw["defaultSignatureAlgorithm"] == "RS256"
    names = {role["name"] for role in raw["roles"]["realm"]}
    assert names == {"unit", "specialist", "coordinator", "relay", "ministry", "admin"}
    assert all(role["clientRole"] is False for role in raw["roles"]["realm"])


def test_api_is_an_audience_only_client(raw: dict[str, Any]) -> None:
    api = clients(raw)["waha-api"]
    assert api["bearerOnly"] is True
    assert not api["standardFlowEnabled"]
    assert not api["directAccessGrantsEnabled"]
    assert not api["serviceAccountsEnabled"]


def test_web_client_is_public_with_pkce(raw: dict[str, Any]) -> None:
    web = clients(raw)["waha-web"]
    assert web["publicClient"] is True
    assert web["standardFlowEnabled"] is True
    assert web["implicitFlowEnabled"] is False
    assert web["directAccessGrantsEnabled"] is False
    assert web["attributes"]["pkce.code.challenge.method"] == "S256"
    assert set(web["redirectUris"]) == {"http://127.0.0.1:8000/*", "http://localhost:8000/*"}


def test_cli_client_is_public_with_direct_grants(raw: dict[str, Any]) -> None:
    cli = clients(raw)["waha-cli"]
    assert cli["publicClient"] is True
    assert cli["directAccessGrantsEnabled"] is True
    assert cli["standardFlowEnabled"] is False


@pytest.mark.parametrize(
    ("unit", "region"), [("unit-01", "marrakech-safi"), ("unit-02", "oriental")]
)
def test_unit_clients_are_confidential_service_accounts(
    raw: dict[str, Any], unit: str, region: str
) -> None:
    client = clients(raw)[unit]
    assert client["publicClient"] is False
    assert client["serviceAccountsEnabled"] is True
    assert client["clientAuthenticatorType"] == "client-secret"
    assert client["secret"] == f"{unit}-secret"
    assert client["standardFlowEnabled"] is False
    assert client["directAccessGrantsEnabled"] is False
    account = users(raw)[f"service-account-{unit}"]
    assert account["serviceAccountClientId"] == unit
    assert account["realmRoles"] == ["unit"]
    assert account["attributes"] == {"waha_unit": [unit], "waha_region": [region]}


def test_dev_users_match_the_design(raw: dict[str, Any]) -> None:
    people = {
        name: user for name, user in users(raw).items() if "serviceAccountClientId" not in user
    }
    assert {name: (user["realmRoles"], user["attributes"]) for name, user in people.items()} == {
        "specialist.derm": (["specialist"], {"waha_specialty": ["394582007"]}),
        "specialist.cardio": (["specialist"], {"waha_specialty": ["394579002"]}),
        "coordinator": (["coordinator"], {"waha_region": ["marrakech-safi"]}),
        "relay": (
            ["relay"],
            {"waha_region": ["marrakech-safi"], "waha_community": ["sidi-bouzid"]},
        ),
        "ministry": (["ministry"], {}),
        "admin": (["admin"], {}),
    }
    for user in people.values():
        assert user["enabled"] is True
        assert user["credentials"] == [
            {"type": "password", "value": "waha-dev", "temporary": False}
        ]
        # Names and e-mail are set so Keycloak asks for no profile update at login.
        assert user["email"] and user["firstName"] and user["lastName"]
        assert user["requiredActions"] == []


def test_user_profile_declares_every_attribute_in_use(raw: dict[str, Any]) -> None:
    providers = raw["components"]["org.keycloak.userprofile.UserProfileProvider"]
    assert [provider["providerId"] for provider in providers] == ["declarative-user-profile"]
    config = json.loads(providers[0]["config"]["kc.user.profile.config"][0])
    by_name = {attribute["name"]: attribute for attribute in config["attributes"]}
    # Keycloak refuses a profile without its built-in attributes.
    assert {"username", "email", "firstName", "lastName"} <= by_name.keys()
    used = {name for user in raw["users"] for name in user.get("attributes", {})}
    assert used <= set(WAHA_CLAIMS)
    assert set(WAHA_CLAIMS) <= declared_profile_attributes(raw)
    for name in WAHA_CLAIMS:
        # Users must not change what they may see: only admins edit these.
        assert by_name[name]["permissions"]["edit"] == ["admin"]
        assert by_name[name]["multivalued"] is False
    assert {group["name"] for group in config["groups"]} >= {"user-metadata", "waha"}


@pytest.mark.parametrize("client_id", TOKEN_CLIENTS)
def test_token_clients_map_audience_roles_and_waha_claims(
    raw: dict[str, Any], client_id: str
) -> None:
    mappers = clients(raw)[client_id]["protocolMappers"]
    for mapper in mappers:
        assert mapper["protocol"] == "openid-connect"
        assert set(mapper) >= {"name", "protocolMapper", "config"}
    by_kind: dict[str, list[dict[str, str]]] = {}
    for mapper in mappers:
        by_kind.setdefault(mapper["protocolMapper"], []).append(mapper["config"])
    (audience,) = by_kind["oidc-audience-mapper"]
    assert audience["included.client.audience"] == "waha-api"
    assert audience["access.token.claim"] == "true"
    (roles,) = by_kind["oidc-usermodel-realm-role-mapper"]
    assert roles["claim.name"] == "realm_access.roles"
    assert roles["multivalued"] == "true"
    assert roles["access.token.claim"] == "true"
    attributes = {
        config["claim.name"]: config for config in by_kind["oidc-usermodel-attribute-mapper"]
    }
    for claim in WAHA_CLAIMS:
        assert attributes[claim]["user.attribute"] == claim
        assert attributes[claim]["access.token.claim"] == "true"


def test_unit_clients_carry_the_client_id_claim(raw: dict[str, Any]) -> None:
    for unit in ("unit-01", "unit-02"):
        notes = [
            mapper["config"]
            for mapper in clients(raw)[unit]["protocolMappers"]
            if mapper["protocolMapper"] == "oidc-usersessionmodel-note-mapper"
        ]
        assert notes == [
            {
                "user.session.note": "client_id",
                "claim.name": "client_id",
                "jsonType.label": "String",
                "access.token.claim": "true",
                "id.token.claim": "true",
                "userinfo.token.claim": "false",
                "introspection.token.claim": "true",
            }
        ]


def test_dev_issuer_reads_the_same_file() -> None:
    realm = load_realm()
    assert realm.name == "waha"
    assert realm.access_token_lifespan == 300
    assert realm.service_account("unit-02") is not None
    assert realm.users["relay"].attributes == {
        "waha_region": ["marrakech-safi"],
        "waha_community": ["sidi-bouzid"],
    }
    assert realm.clients["waha-web"].requires_pkce
    assert realm.clients["waha-web"].accepts_redirect("http://localhost:8000/app/callback")
    assert not realm.clients["waha-web"].accepts_redirect("http://evil.example/callback")


def test_platform_folder_stays_a_non_package() -> None:
    assert not (REALM_FILE.parent / "__init__.py").exists()
    assert not (REALM_FILE.parent.parent / "__init__.py").exists()
