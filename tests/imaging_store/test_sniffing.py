"""Type sniffing: allowed types by signature, everything else refused."""

from __future__ import annotations

import pytest

from imaging_store.errors import ContentTypeNotAllowed
from imaging_store.sniffing import ALLOWED_TYPES, sniff_content_type
from tests.imaging_store import samples


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (samples.png(), "image/png"),
        (samples.jpeg(), "image/jpeg"),
        (samples.webp(), "image/webp"),
        (samples.heic(), "image/heic"),
        (samples.dicom(), "application/dicom"),
        (samples.pdf(), "application/pdf"),
        (samples.TEXT, "text/plain"),
    ],
)
def test_allowed_types_are_recognised(content: bytes, expected: str) -> None:
    assert expected in ALLOWED_TYPES
    assert sniff_content_type(content, valid_text=True) == expected


def test_dicom_needs_the_whole_dicm_magic() -> None:
    # filetype alone accepts "DIC" at 128; Waha wants the four bytes.
    almost = bytes(128) + b"DICX" + bytes(16)
    with pytest.raises(ContentTypeNotAllowed):
        sniff_content_type(almost, valid_text=False)


def test_a_heif_file_without_a_hevc_brand_is_refused() -> None:
    avif = b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif"
    with pytest.raises(ContentTypeNotAllowed):
        sniff_content_type(avif, valid_text=False)


@pytest.mark.parametrize(
    "content",
    [
        samples.HTML,
        samples.SVG,
        samples.XML_SVG,
        samples.SHELL_SCRIPT,
        b"  \n<div>markup</div>",
        b"see javascript:alert(1)",
        b"note with <script>x</script> inside",
    ],
)
def test_active_text_is_refused(content: bytes) -> None:
    with pytest.raises(ContentTypeNotAllowed):
        sniff_content_type(content, valid_text=True)


def test_text_that_is_not_valid_utf8_is_refused() -> None:
    with pytest.raises(ContentTypeNotAllowed):
        sniff_content_type(b"caf\xe9", valid_text=False)
