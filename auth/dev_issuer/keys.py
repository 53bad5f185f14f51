"""The dev issuer's RS256 signing keys: kept in the dev data folder, rotatable."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwcrypto import jwk

KEY_SIZE = 2048


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key pair and when it was created and retired (seconds since the epoch)."""

    key: jwk.JWK
    created_at: float
    retired_at: float | None

    @property
    def kid(self) -> str:
        """Return the key id tokens name in their header."""
        return str(self.key.get("kid"))

    def public_jwk(self) -> dict[str, Any]:
        """Return the public half as a JWKS entry."""
        public: dict[str, Any] = self.key.export_public(as_dict=True)
        public.update({"use": "sig", "alg": "RS256"})
        return public


class KeyStore:
    """Signing keys in `<data dir>/keys/*.json`, reloaded when the folder changes.

    The newest key that is not retired signs. A rotated key stays published
    (and usable to verify the issuer's own refresh tokens) for `retention_seconds`
    after it was retired, the longest a token it signed can live, then it is
    deleted. Several processes (the issuer, `waha dev-issuer rotate-keys`) may
    share the folder: files are written whole and renamed into place.
    """

    def __init__(self, data_dir: Path, *, retention_seconds: int) -> None:
        self.folder = data_dir / "keys"
        self.retention_seconds = retention_seconds
        self._keys: list[SigningKey] = []
        self._loaded_signature: tuple[tuple[str, int, int], ...] | None = None

    def active(self) -> SigningKey:
        """Return the key that signs new tokens, creating the first one if needed."""
        self._refresh()
        current = [key for key in self._keys if key.retired_at is None]
        if not current:
            self.rotate()
            current = [key for key in self._keys if key.retired_at is None]
        return max(current, key=lambda key: key.created_at)

    def published(self) -> list[SigningKey]:
        """Return every key whose tokens may still be alive, newest first."""
        self.active()
        return sorted(self._keys, key=lambda key: key.created_at, reverse=True)

    def find(self, kid: str) -> SigningKey | None:
        """Return a published key by id."""
        return next((key for key in self.published() if key.kid == kid), None)

    def rotate(self) -> SigningKey:
        """Create a new signing key and retire the current ones."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._refresh()
        for old in self._keys:
            if old.retired_at is None:
                self._write(SigningKey(old.key, old.created_at, now))
        created = jwk.JWK.generate(kty="RSA", size=KEY_SIZE, use="sig", alg="RS256")
        new = SigningKey(_with_kid(created), now, None)
        self._write(new)
        self._refresh()
        return new

    def _write(self, key: SigningKey) -> None:
        record = {
            "created_at": key.created_at,
            "retired_at": key.retired_at,
            "jwk": key.key.export_private(as_dict=True),
        }
        target = self.folder / f"{key.kid}.json"
        temporary = target.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        temporary.replace(target)

    def _refresh(self) -> None:
        if not self.folder.is_dir():
            self._keys, self._loaded_signature = [], None
            return
        paths = sorted(self.folder.glob("*.json"))
        # Names, times and sizes of a handful of files: cheap enough to check on
        # every request, and it notices another process's rotation at once.
        statuses = [(path.name, path.stat()) for path in paths]
        signature = tuple((name, status.st_mtime_ns, status.st_size) for name, status in statuses)
        if signature == self._loaded_signature:
            self._expire()
            return
        keys = []
        for path in paths:
            record = json.loads(path.read_text(encoding="utf-8"))
            keys.append(
                SigningKey(
                    jwk.JWK(**record["jwk"]), float(record["created_at"]), record["retired_at"]
                )
            )
        self._keys, self._loaded_signature = keys, signature
        self._expire()

    def _expire(self) -> None:
        cutoff = time.time() - self.retention_seconds
        for key in [k for k in self._keys if k.retired_at is not None and k.retired_at < cutoff]:
            (self.folder / f"{key.kid}.json").unlink(missing_ok=True)
            self._keys.remove(key)


def _with_kid(key: jwk.JWK) -> jwk.JWK:
    """Name a key by its RFC 7638 thumbprint, as a stable, unique key id."""
    exported = key.export_private(as_dict=True)
    exported["kid"] = key.thumbprint()
    return jwk.JWK(**exported)
