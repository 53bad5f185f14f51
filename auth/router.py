"""Public discovery documents of the API: where to get tokens, and what they may say."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from hub.settings import Settings, request_settings

router = APIRouter()
SettingsDep = Annotated[Settings, Depends(request_settings)]


@router.get("/fhir/.well-known/smart-configuration", response_model=None)
async def smart_configuration(settings: SettingsDep) -> dict[str, Any]:
    """Answer the SMART App Launch 2.0 configuration: the issuer's endpoints and capabilities."""
    issuer = settings.oidc_issuer.rstrip("/")
    protocol = f"{issuer}/protocol/openid-connect"
    return {
        "issuer": issuer,
        "jwks_uri": f"{protocol}/certs",
        "authorization_endpoint": f"{protocol}/auth",
        "token_endpoint": f"{protocol}/token",
        "userinfo_endpoint": f"{protocol}/userinfo",
        "end_session_endpoint": f"{protocol}/logout",
        "grant_types_supported": [
            "authorization_code",
            "client_credentials",
            "refresh_token",
        ],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "private_key_jwt",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": [
            "openid",
            "profile",
            "offline_access",
            "system/*.cruds",
            "user/*.cruds",
            "user/*.rs",
        ],
        "capabilities": [
            "launch-standalone",
            "client-public",
            "client-confidential-symmetric",
            "client-confidential-asymmetric",
            "context-standalone-patient",
            "permission-v1",
            "permission-v2",
            "permission-user",
            "sso-openid-connect",
        ],
    }
