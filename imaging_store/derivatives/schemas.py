"""Response bodies of the derivatives' HTTP edge."""

from __future__ import annotations

from pydantic import BaseModel


class DerivativePending(BaseModel):
    """A preview that is not made yet: ask again after Retry-After seconds."""

    binary: str
    kind: str
    status: str
