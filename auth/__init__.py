"""Identity and access: bearer-token validation and the embedded dev OIDC issuer."""
