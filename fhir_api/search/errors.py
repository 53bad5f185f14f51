"""Errors of the search API, each a 400 with its FHIR issue type."""

from __future__ import annotations

from hub.errors import WahaError


class InvalidSearch(WahaError):
    """A search value, prefix, modifier or result parameter is malformed."""

    status = 400
    issue_code = "invalid"
    slug = "invalid-search"


class UnknownSearchParameter(WahaError):
    """A parameter the type does not define, refused under `Prefer: handling=strict`."""

    status = 400
    issue_code = "not-supported"
    slug = "unknown-search-parameter"


class UnsupportedModifier(WahaError):
    """A modifier the parameter's type does not have, or that Waha cannot evaluate."""

    status = 400
    issue_code = "not-supported"
    slug = "unsupported-search-modifier"


class SearchTooCostly(WahaError):
    """A search with more values or parameters than one request may ask for."""

    status = 400
    issue_code = "too-costly"
    slug = "search-too-costly"
