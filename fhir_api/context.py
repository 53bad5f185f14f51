"""Who is calling and on which request; every stored version records its author."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The caller of one interaction, filled by the API edge (and later by auth)."""

    client_id: str
    author: str
    request_id: str


SYSTEM_CONTEXT = RequestContext(client_id="waha-system", author="waha-system", request_id="-")
