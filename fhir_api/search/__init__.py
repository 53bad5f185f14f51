"""FHIR R4 search over the record store's index: parser, SQL and Bundle assembly.

`parser` turns query parameters into typed criteria encoded like ingest's index
keys (`fhir_api.search_index`); `repository` holds all SQL and the one scope hook
(`SearchScope`, applied by `repository.visible`); `service` runs searches with
keyset paging, includes and result shaping.
"""

from fhir_api.search.repository import UNRESTRICTED, SearchScope
from fhir_api.search.service import compartment_search, search, system_search

__all__ = ["UNRESTRICTED", "SearchScope", "compartment_search", "search", "system_search"]
