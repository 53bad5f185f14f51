"""Small but well-formed files of every allowed type, and disguised ones, made in code."""

from __future__ import annotations

import struct
import zlib


def png(width: int = 2, height: int = 2) -> bytes:
    """Return a valid RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x80\x40\x20" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def jpeg() -> bytes:
    """Return bytes with a JFIF header and end marker (what a sniffer looks at)."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + app0 + b"\xff\xdb\x00\x43\x00" + bytes(range(64)) + b"\xff\xd9"


def webp() -> bytes:
    """Return a RIFF/WEBP container with a VP8L chunk header."""
    payload = b"WEBPVP8L" + struct.pack("<I", 10) + b"\x2f\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def heic() -> bytes:
    """Return an ISO-BMFF file whose ftyp box names the HEIC brand."""
    ftyp = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\x00\x00\x00\x08free"


def dicom() -> bytes:
    """Return a DICOM Part 10 file start: preamble, DICM, a group-length element."""
    return bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x54\x00\x00\x00"


def pdf() -> bytes:
    """Return a minimal PDF."""
    return b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


HTML = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>'
XML_SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'
SHELL_SCRIPT = b"#!/bin/sh\nrm -rf /\n"
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
WINDOWS_EXE = b"MZ\x90\x00\x03\x00\x00\x00" + bytes(56)
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
TEXT = "Tension 14/8, contrôle dans 3 mois.\n".encode()
