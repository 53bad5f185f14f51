"""SHA-256 and SHA-1 whose running state can be saved and taken up by another process.

A tus upload's PATCHes may reach different API processes, and hashlib's
objects cannot be serialized, so without this the process that receives the
last bytes would read the whole object back to hash it. OpenSSL's low-level
digest functions (`SHA256_Init`/`_Update`/`_Final`, `SHA1_*`; deprecated in
OpenSSL 3 but still exported) keep the whole state in a plain struct that the
caller owns, so its bytes are the state: saved with the upload's offset, they
are taken up wherever the next PATCH lands, with OpenSSL's own speed.

The struct layout is checked when this module loads: a state saved mid-block
and taken up in a fresh context must give hashlib's digest. If libcrypto, its
functions or that check fail, `RESUMABLE` is False and callers keep hashlib
(and read back instead). OpenSSL trusts a context's fields (a block position
past 64 writes past the context), so a saved state is taken up only if its
fields agree with the number of bytes it claims to cover.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct
import sys
from collections.abc import Iterator
from typing import Protocol

# sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len, all 32-bit.
SHA256_STATE_BYTES = 112
# sizeof(SHA_CTX): h0..h4, Nl, Nh, data[16], num.
_SHA1_STATE_BYTES = 96
# Contexts are allocated larger than the state they carry, so that a build
# with a larger struct fails the load check instead of writing past the buffer.
_CONTEXT_BYTES = 512
_DIGEST_BYTES = {"sha256": 32, "sha1": 20}
_STATE_BYTES = {"sha256": SHA256_STATE_BYTES, "sha1": _SHA1_STATE_BYTES}
# Where the bit count (Nl, Nh), the block position (num) and, for SHA-256, the
# digest length (md_len) sit in each struct, as native 32-bit integers.
_BIT_COUNT_AT = {"sha256": 32, "sha1": 20}
_BLOCK_POSITION_AT = {"sha256": 104, "sha1": 92}
_SHA256_MD_LEN_AT = 108
_BLOCK_BYTES = 64
_FUNCTION_PREFIX = {"sha256": "SHA256", "sha1": "SHA1"}


class RunningHash(Protocol):
    """What ContentDigests needs of a hash: hashlib's objects and ResumableHash both fit."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...

    def copy(self) -> RunningHash: ...


class _Functions:
    """One algorithm's Init/Update/Final in libcrypto."""

    def __init__(self, library: ctypes.CDLL, algorithm: str) -> None:
        prefix = _FUNCTION_PREFIX[algorithm]
        self.init = getattr(library, f"{prefix}_Init")
        self.update = getattr(library, f"{prefix}_Update")
        self.final = getattr(library, f"{prefix}_Final")
        self.init.argtypes = [ctypes.c_void_p]
        self.update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        self.final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        for function in (self.init, self.update, self.final):
            function.restype = ctypes.c_int


def _library_names() -> Iterator[str]:
    # Versioned names first: find_library runs ldconfig or a compiler to search.
    yield from ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib")
    # On macOS it finds the system's unversioned libcrypto, whose loading
    # aborts the process (no exception to catch).
    if sys.platform != "darwin":
        found = ctypes.util.find_library("crypto")
        if found is not None:
            yield found


def _load_functions() -> dict[str, _Functions] | None:
    for name in _library_names():
        try:
            library = ctypes.CDLL(name)
            return {algorithm: _Functions(library, algorithm) for algorithm in _DIGEST_BYTES}
        except (OSError, AttributeError):
            continue
    return None


_FUNCTIONS = _load_functions()


class ResumableHash:
    """A running SHA-256 or SHA-1 whose state is bytes (`state`, `resume`)."""

    __slots__ = ("_algorithm", "_context", "_functions")

    def __init__(
        self, algorithm: str, *, state: bytes | None = None, size: int | None = None
    ) -> None:
        """Start afresh, or take up `state` covering `size` bytes (ValueError if it cannot)."""
        if _FUNCTIONS is None:
            raise RuntimeError("libcrypto's digest functions are not available")
        self._algorithm = algorithm
        self._functions = _FUNCTIONS[algorithm]
        self._context = ctypes.create_string_buffer(_CONTEXT_BYTES)
        if state is None:
            if self._functions.init(self._context) != 1:
                raise RuntimeError(f"{algorithm} could not start")
        else:
            if size is None or not _consistent(algorithm, state, size):
                raise ValueError(f"not a {algorithm} state of {size} bytes")
            ctypes.memmove(self._context, state, len(state))

    def update(self, data: bytes, /) -> None:
        """Hash the next bytes (ctypes lets other threads run meanwhile)."""
        if not isinstance(data, bytes):
            # Counted in bytes, whatever the buffer's item size.
            data = memoryview(data).cast("B").tobytes()
        if self._functions.update(self._context, data, len(data)) != 1:
            raise RuntimeError(f"{self._algorithm} failed")

    def digest(self) -> bytes:
        """Return the digest of the bytes so far; the hash can go on."""
        out = ctypes.create_string_buffer(_DIGEST_BYTES[self._algorithm])
        if self._functions.final(out, self.copy()._context) != 1:
            raise RuntimeError(f"{self._algorithm} failed")
        return out.raw

    def copy(self) -> ResumableHash:
        """Return an independent copy."""
        twin = ResumableHash(self._algorithm)
        ctypes.memmove(twin._context, self._context, _CONTEXT_BYTES)
        return twin

    @property
    def state(self) -> bytes:
        """Return the running state, for `ResumableHash(algorithm, state=..., size=...)`."""
        return self._context.raw[: _STATE_BYTES[self._algorithm]]


def _consistent(algorithm: str, state: bytes, size: int) -> bool:
    """Tell whether a saved state is one this layout wrote after hashing `size` bytes."""
    if len(state) != _STATE_BYTES[algorithm] or size < 0:
        return False
    low, high = struct.unpack_from("=II", state, _BIT_COUNT_AT[algorithm])
    (position,) = struct.unpack_from("=I", state, _BLOCK_POSITION_AT[algorithm])
    if (high << 32 | low) != (size * 8) % (1 << 64) or position != size % _BLOCK_BYTES:
        return False
    if algorithm == "sha256":
        (digest_length,) = struct.unpack_from("=I", state, _SHA256_MD_LEN_AT)
        return bool(digest_length == _DIGEST_BYTES["sha256"])
    return True


def _layout_holds() -> bool:
    """Tell whether a state saved mid-block and taken up again gives hashlib's digest."""
    if _FUNCTIONS is None:
        return False
    data = bytes(range(256)) * 5
    try:
        for algorithm in _DIGEST_BYTES:
            running = ResumableHash(algorithm)
            # 100 bytes: one whole 64-byte block and a part of the next.
            running.update(data[:100])
            taken_up = ResumableHash(algorithm, state=running.state, size=100)
            taken_up.update(data[100:])
            if taken_up.digest() != hashlib.new(algorithm, data).digest():
                return False
    except (RuntimeError, ValueError):
        return False
    return True


RESUMABLE = _layout_holds()


def new_hash(algorithm: str) -> RunningHash:
    """Return a fresh SHA-256 or SHA-1: resumable when libcrypto allows it, else hashlib's."""
    if RESUMABLE:
        return ResumableHash(algorithm)
    return hashlib.new(algorithm, usedforsecurity=algorithm != "sha1")
