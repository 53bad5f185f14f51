"""Resumable SHA-256 and SHA-1, and the ContentDigests state built on them."""

from __future__ import annotations

import array
import hashlib
import random
import struct
import subprocess
import sys

import pytest

from imaging_store import hash_states, service
from imaging_store.hash_states import RESUMABLE, ResumableHash, new_hash
from imaging_store.service import ContentDigests

needs_libcrypto = pytest.mark.skipif(not RESUMABLE, reason="no libcrypto digest contexts")

DATA = random.Random(7).randbytes(200_003)  # noqa: S311 - test data


@needs_libcrypto
@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
@pytest.mark.parametrize("cut", [0, 1, 63, 64, 65, 100_000, 200_003])
def test_a_state_taken_up_anywhere_in_a_block_gives_hashlibs_digest(
    algorithm: str, cut: int
) -> None:
    running = ResumableHash(algorithm)
    running.update(DATA[:cut])
    taken_up = ResumableHash(algorithm, state=running.state, size=cut)
    taken_up.update(DATA[cut:])
    assert taken_up.digest() == hashlib.new(algorithm, DATA).digest()
    # digest() leaves the hash running, as hashlib's does.
    assert running.digest() == hashlib.new(algorithm, DATA[:cut]).digest()
    running.update(DATA[cut:])
    assert running.digest() == taken_up.digest()


@needs_libcrypto
def test_a_state_saved_by_another_process_is_taken_up_here() -> None:
    script = (
        "import sys; from imaging_store.hash_states import ResumableHash;"
        "h = ResumableHash('sha256'); h.update(sys.stdin.buffer.read());"
        "sys.stdout.write(h.state.hex())"
    )
    saved = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script], input=DATA[:70_001], capture_output=True, check=True
    ).stdout
    taken_up = ResumableHash("sha256", state=bytes.fromhex(saved.decode()), size=70_001)
    taken_up.update(DATA[70_001:])
    assert taken_up.digest() == hashlib.sha256(DATA).digest()


@needs_libcrypto
def _damaged(state: bytes, at: int, value: int) -> bytes:
    """Return `state` with the native 32-bit field at `at` set to `value`."""
    return state[:at] + struct.pack("=I", value) + state[at + 4 :]


@needs_libcrypto
@pytest.mark.parametrize(
    ("algorithm", "damage"),
    [
        ("sha256", "short"),
        ("sha256", "block position past the block"),
        ("sha256", "block position off"),
        ("sha256", "bit count off"),
        ("sha256", "digest length"),
        ("sha1", "block position past the block"),
        ("sha1", "bit count off"),
        ("sha256", "other size"),
    ],
)
def test_a_state_that_disagrees_with_its_size_is_refused(algorithm: str, damage: str) -> None:
    """OpenSSL trusts a context's fields: a block position past 64 would write past it."""
    running = ResumableHash(algorithm)
    running.update(DATA[:1_000])
    state, size = running.state, 1_000
    bits, position = {"sha256": (32, 104), "sha1": (20, 92)}[algorithm]
    damaged, claimed = {
        "short": (state[:-1], size),
        "block position past the block": (_damaged(state, position, 70), size),
        "block position off": (_damaged(state, position, size % 64 + 1), size),
        "bit count off": (_damaged(state, bits, size * 8 + 8), size),
        "digest length": (_damaged(state, 108, 0), size),
        "other size": (state, size + 64),
    }[damage]
    with pytest.raises(ValueError, match=f"not a {algorithm} state"):
        ResumableHash(algorithm, state=damaged, size=claimed)


@needs_libcrypto
def test_update_counts_bytes_whatever_the_buffers_item_size() -> None:
    numbers = array.array("I", range(100))
    running = ResumableHash("sha256")
    running.update(memoryview(numbers))  # type: ignore[arg-type]
    assert running.digest() == hashlib.sha256(numbers.tobytes()).digest()


@needs_libcrypto
def test_copies_go_on_independently() -> None:
    first = new_hash("sha1")
    first.update(b"abc")
    second = first.copy()
    second.update(b"def")
    assert first.digest() == hashlib.sha1(b"abc").digest()  # noqa: S324 - R4 Attachment.hash
    assert second.digest() == hashlib.sha1(b"abcdef").digest()  # noqa: S324


@needs_libcrypto
def test_content_digests_resume_with_their_head_size_and_text_state() -> None:
    text = "Résumé لمريض ".encode() * 1_000
    # Cut inside a two-byte character: the decoder's pending byte is part of the state.
    cut = text.index("é".encode()) + 1
    before = ContentDigests()
    before.feed(text[:cut])
    state = before.state()
    assert state is not None
    # Content stays out of the saved state, but for an unfinished block's bytes.
    assert text[:64] not in state
    resumed = ContentDigests.resume(state, size=cut)
    assert resumed is not None
    resumed.feed(text[cut:])
    whole = ContentDigests()
    whole.feed(text)
    assert (resumed.size, resumed.valid_text) == (len(text), True)
    assert (resumed.sha256, resumed.sha1) == (whole.sha256, whole.sha1)
    # The head is not in the state: whoever sniffs reads it from the object.
    assert (resumed.head_known, resumed.head) == (False, b"")


@needs_libcrypto
def test_content_digests_resume_knows_binary_content_is_not_text() -> None:
    before = ContentDigests()
    before.feed(b"\xff\xd8\xff\xe0 a JPEG")
    resumed = ContentDigests.resume(before.state() or b"", size=before.size)
    assert resumed is not None
    resumed.feed(b"plain ASCII after")
    assert not resumed.valid_text


@pytest.mark.parametrize("damage", ["truncated", "other version", "empty", "other size"])
def test_an_unreadable_state_is_not_taken_up(damage: str) -> None:
    digests = ContentDigests()
    digests.feed(DATA[:1_000])
    state = digests.state()
    assert state is not None
    damaged, size = {
        "truncated": (state[:-1], 1_000),
        "other version": (bytes([state[0] + 1]) + state[1:], 1_000),
        "empty": (b"", 1_000),
        "other size": (state, 2_000),
    }[damage]
    assert ContentDigests.resume(damaged, size=size) is None


def test_without_libcrypto_digests_are_hashlibs_and_have_no_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hash_states, "RESUMABLE", False)
    monkeypatch.setattr(service, "RESUMABLE", False)
    digests = ContentDigests()
    digests.feed(b"some bytes")
    assert digests.sha256 == hashlib.sha256(b"some bytes").digest()
    assert digests.state() is None
    assert ContentDigests.resume(b"anything", size=9) is None
