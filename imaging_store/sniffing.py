"""Decide a Binary's media type from its bytes, never from what the client declared.

`filetype` (magic numbers) names what the bytes are; an allowed type must
also pass Waha's own signature check, and anything it recognises that is
not on the allow-list is refused. Bytes it does not recognise are accepted
only as plain text: valid UTF-8, no NUL, and no markup or script, since a
browser or viewer that ignores `nosniff` would run HTML, SVG or a script.
"""

from __future__ import annotations

import filetype

from imaging_store.errors import ContentTypeNotAllowed

JPEG = "image/jpeg"
PNG = "image/png"
WEBP = "image/webp"
HEIC = "image/heic"
DICOM = "application/dicom"
PDF = "application/pdf"
TEXT = "text/plain"
ALLOWED_TYPES = (JPEG, PNG, WEBP, HEIC, DICOM, PDF, TEXT)

# How many leading bytes the sniffers look at (filetype reads 8 KiB too).
HEAD_BYTES = 8192

# ISO-BMFF brands of HEIF images coded with HEVC (ISO/IEC 23008-12 Annex B).
_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"}
# Markers of active content in what would otherwise pass as text (WHATWG
# MIME sniffing's HTML patterns, plus SVG/XML and script openers).
_ACTIVE_TEXT_MARKERS = (
    "<!doctype",
    "<html",
    "<head",
    "<body",
    "<script",
    "<iframe",
    "<svg",
    "<?xml",
    "<object",
    "<embed",
    "javascript:",
)


def _is_jpeg(head: bytes) -> bool:
    return head[:3] == b"\xff\xd8\xff"


def _is_png(head: bytes) -> bool:
    return head[:8] == b"\x89PNG\r\n\x1a\n"


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _is_heic(head: bytes) -> bool:
    if head[4:8] != b"ftyp":
        return False
    box_size = int.from_bytes(head[:4], "big")
    brands = [head[8:12]] + [
        head[offset : offset + 4] for offset in range(16, min(box_size, len(head)) - 3, 4)
    ]
    return any(brand in _HEIC_BRANDS for brand in brands)


def is_dicom(head: bytes) -> bool:
    """Tell whether the bytes are a DICOM Part 10 file (128-byte preamble, then DICM)."""
    return head[128:132] == b"DICM"


def _is_pdf(head: bytes) -> bool:
    return head[:5] == b"%PDF-"


_SIGNATURE_CHECKS = {JPEG: _is_jpeg, PNG: _is_png, WEBP: _is_webp, HEIC: _is_heic, PDF: _is_pdf}


def _is_plain_text(head: bytes) -> bool:
    sample = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n").lower()
    if sample.startswith(("<", "#!")):
        return False
    return not any(marker in sample for marker in _ACTIVE_TEXT_MARKERS)


def sniff_content_type(head: bytes, *, valid_text: bool) -> str:
    """Return the allowed media type of content starting with `head`, or refuse it.

    `valid_text` says the whole content is UTF-8 without NUL; only the caller
    that saw every byte can know it.
    """
    # DICOM first: its 128-byte preamble is free-form (some files put a TIFF
    # header there), so a magic-number guess on offset 0 can mislead.
    if is_dicom(head):
        return DICOM
    guess = filetype.guess(head) if head else None
    if guess is not None:
        check = _SIGNATURE_CHECKS.get(guess.mime)
        if check is not None and check(head):
            return str(guess.mime)
        raise ContentTypeNotAllowed(f"content recognised as {guess.mime} is not allowed")
    if valid_text and _is_plain_text(head):
        return TEXT
    raise ContentTypeNotAllowed(
        "content type not allowed: send JPEG, PNG, WebP, HEIC, DICOM, PDF or plain UTF-8 text"
    )
