"""The dev issuer's HTTP surface, at Keycloak's paths under `/realms/<realm>/`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape

from auth.dev_issuer.errors import OAuthError
from auth.dev_issuer.service import DevIssuer, LoginExpired, LoginFailed, RedirectError

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# The login page must not be framed (clickjacking) nor cached.
PAGE_HEADERS = {
    **NO_STORE,
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

templates = Jinja2Templates(
    env=Environment(
        loader=PackageLoader("auth.dev_issuer", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
)


def issuer_url(request: Request, realm_name: str) -> str:
    """Return the issuer as seen by this request (Keycloak without a fixed hostname)."""
    return f"{str(request.base_url).rstrip('/')}/realms/{realm_name}"


async def read_form(request: Request) -> dict[str, str]:
    """Return the form fields; RFC 6749 §3.2: a parameter must not appear twice."""
    form = await request.form()
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in fields:
            raise OAuthError("invalid_request", f"Duplicated parameter: {name}")
        if isinstance(value, str):
            fields[name] = value
    return fields


def oauth_error_response(error: OAuthError) -> Response:
    """Render an OAuth error as Keycloak does: JSON `error` and `error_description`."""
    headers = dict(NO_STORE)
    if error.status == 401 and error.error == "invalid_token":
        headers["WWW-Authenticate"] = f'Bearer error="{error.error}"'
    return JSONResponse(
        {"error": error.error, "error_description": error.description},
        status_code=error.status,
        headers=headers,
    )


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    return templates.TemplateResponse(
        request, f"dev_issuer/{name}", context, status_code=status, headers=PAGE_HEADERS
    )


def build_router(issuer: DevIssuer) -> APIRouter:
    """Return the routes of one realm."""
    realm = issuer.realm.name
    router = APIRouter(prefix=f"/realms/{realm}")
    protocol = "/protocol/openid-connect"

    @router.get("")
    def realm_info(request: Request) -> dict[str, Any]:
        """Describe the realm as Keycloak's public realm endpoint does."""
        base = issuer_url(request, realm)
        return {
            "realm": realm,
            "public_key": issuer.public_key(),
            "token-service": f"{base}{protocol}",
            "account-service": f"{base}/account",
            "tokens-not-before": 0,
        }

    @router.get("/.well-known/openid-configuration")
    def discovery(request: Request) -> dict[str, Any]:
        """Return the OpenID Provider metadata."""
        return issuer.discovery(issuer_url(request, realm))

    @router.get(f"{protocol}/certs")
    def certs() -> dict[str, Any]:
        """Return the JWKS of the signing keys."""
        return issuer.jwks()

    @router.post(f"{protocol}/token")
    async def token(request: Request) -> Response:
        """Issue tokens for the four supported grants."""
        form = await read_form(request)
        answer = issuer.token(
            issuer=issuer_url(request, realm),
            form=form,
            authorization=request.headers.get("authorization"),
        )
        return JSONResponse(answer, headers=NO_STORE)

    @router.get(f"{protocol}/auth")
    def authorize(request: Request) -> Response:
        """Start the authorization code flow: show the login form."""
        params = dict(request.query_params)
        try:
            login = issuer.start_login(params)
        except RedirectError as redirect:
            return RedirectResponse(redirect.location, status_code=302)
        except OAuthError as error:
            # The redirect URI is not trusted yet: tell the user, never redirect.
            return _page(
                request,
                "message.html",
                {"title": "We are sorry…", "message": error.description, "error": True},
                status=400,
            )
        return _page(
            request,
            "login.html",
            {
                "realm_name": realm,
                "client_id": login.client_id,
                "login_id": login.login_id,
                "action": request.url_for("dev_issuer_authenticate"),
                "username": "",
                "error": None,
            },
        )

    @router.post("/login-actions/authenticate", name="dev_issuer_authenticate")
    async def authenticate(request: Request) -> Response:
        """Check the login form; redirect to the client with a code."""
        form = await read_form(request)
        login_id = form.get("login_id", "")
        try:
            result = issuer.finish_login(
                issuer=issuer_url(request, realm),
                login_id=login_id,
                username=form.get("username", ""),
                password=form.get("password", ""),
            )
        except LoginExpired:
            return _page(
                request,
                "message.html",
                {
                    "title": "Login expired",
                    "message": "Start again from the application.",
                    "error": True,
                },
                status=400,
            )
        except LoginFailed:
            login = issuer.pending_login(login_id)
            return _page(
                request,
                "login.html",
                {
                    "realm_name": realm,
                    "client_id": login.client_id if login else "",
                    "login_id": login_id,
                    "action": request.url_for("dev_issuer_authenticate"),
                    "username": form.get("username", ""),
                    "error": "Invalid username or password.",
                },
                status=401,
            )
        return RedirectResponse(result.redirect_to, status_code=302)

    @router.api_route(f"{protocol}/logout", methods=["GET", "POST"])
    async def logout(request: Request) -> Response:
        """End a session: back-channel with a refresh token, or from the browser."""
        base = issuer_url(request, realm)
        form = await read_form(request) if request.method == "POST" else {}
        if "refresh_token" in form:
            issuer.logout_with_refresh_token(
                issuer=base, form=form, authorization=request.headers.get("authorization")
            )
            return Response(status_code=204, headers=NO_STORE)
        params = {**dict(request.query_params), **form}
        redirect = issuer.logout_from_browser(issuer=base, params=params)
        if redirect:
            return RedirectResponse(redirect, status_code=302)
        return _page(
            request,
            "message.html",
            {"title": "Signed out", "message": "You are signed out.", "error": False},
        )

    @router.api_route(f"{protocol}/userinfo", methods=["GET", "POST"])
    def userinfo(request: Request) -> Response:
        """Return the claims of the user the bearer token speaks for."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise OAuthError("invalid_token", "Missing bearer token", status=401)
        claims = issuer.userinfo(issuer=issuer_url(request, realm), access_token=token.strip())
        return JSONResponse(claims, headers=NO_STORE)

    return router
