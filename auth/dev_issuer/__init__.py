"""The embedded development OIDC issuer: Keycloak's URLs and token shapes, from the realm file."""
