"""Resumable SHA-256 and SHA-1, and the ContentDigests state built on them."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest

from imaging_store import hash_states, service
from imaging_store.hash_states import RESUMABLE, SHA256_STATE_BYTES, ResumableHash, new_hash
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
    taken_up = ResumableHash(algorithm, state=running.state)
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
    taken_up = ResumableHash("sha256", state=bytes.fromhex(saved.decode()))
    taken_up.update(DATA[70_001:])
    assert taken_up.digest() == hashlib.sha256(DATA).digest()


@needs_libcrypto
def test_a_state_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="112 bytes"):
        ResumableHash("sha256", state=b"\0" * (SHA256_STATE_BYTES - 1))


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
    resumed = ContentDigests.resume(state)
    assert resumed is not None
    resumed.feed(text[cut:])
    whole = ContentDigests()
    whole.feed(text)
    assert (resumed.size, resumed.head, resumed.valid_text) == (len(text), whole.head, True)
    assert (resumed.sha256, resumed.sha1) == (whole.sha256, whole.sha1)


@needs_libcrypto
def test_content_digests_resume_knows_binary_content_is_not_text() -> None:
    before = ContentDigests()
    before.feed(b"\xff\xd8\xff\xe0 a JPEG")
    resumed = ContentDigests.resume(before.state() or b"")
    assert resumed is not None
    resumed.feed(b"plain ASCII after")
    assert not resumed.valid_text


@pytest.mark.parametrize("damage", ["truncated", "other version", "empty"])
def test_an_unreadable_state_is_not_taken_up(damage: str) -> None:
    digests = ContentDigests()
    digests.feed(DATA[:1_000])
    state = digests.state()
    assert state is not None
    damaged = {
        "truncated": state[:-1],
        "other version": bytes([state[0] + 1]) + state[1:],
        "empty": b"",
    }[damage]
    assert ContentDigests.resume(damaged) is None


def test_without_libcrypto_digests_are_hashlibs_and_have_no_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hash_states, "RESUMABLE", False)
    monkeypatch.setattr(service, "RESUMABLE", False)
    digests = ContentDigests()
    digests.feed(b"some bytes")
    assert digests.sha256 == hashlib.sha256(b"some bytes").digest()
    assert digests.state() is None
    assert ContentDigests.resume(b"anything") is None
