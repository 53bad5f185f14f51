"""Pillow work: upright, location-free JPEG previews of a photo and its quality verdict.

Everything here is pure: bytes in, bytes and numbers out, no database or storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageFilter, ImageOps, ImageStat, UnidentifiedImageError
from pillow_heif import register_heif_opener

# HEIC is what iPhones and many Android phones of the units take by default.
register_heif_opener()

THUMBNAIL_EDGE = 256
PREVIEW_EDGE = 1600
JPEG_QUALITY = 85
# Pillow's decoders a photo may go through: the allowed image types only, so
# a file sniffed as JPEG cannot reach a rarely used (and less audited) plugin.
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
# Refuse before decoding: above the 48-50 MP full-resolution mode of current
# phone cameras with margin, and below Pillow's own bomb warning (~89 MP), so
# a crafted header cannot make a worker allocate gigabytes.
MAX_SOURCE_PIXELS = 64_000_000

QUALITY_OK = "ok"
QUALITY_TOO_SMALL = "too-small"
QUALITY_TOO_DARK = "too-dark"
QUALITY_BLURRED = "blurred"
# A specialist zooms into a lesion or a fundus: below 640 px on the long side
# (VGA) there is too little detail to read, whatever the sharpness.
MIN_LONG_EDGE = 640
# Mean luma on 0-255 (ITU-R 601). Below 40 the picture is mostly shadow: flash
# off in a dim vehicle, a finger over the lens.
MIN_MEAN_LUMINANCE = 40.0
# Variance of the Laplacian on the <=1600 px grayscale preview, the usual
# focus measure. Measured on synthetic scenes: sharp ~1500, Gaussian blur of
# 1 px ~160, of 2 px ~15; 50 flags a visibly soft photo, not a smooth subject.
MIN_EDGE_VARIANCE = 50.0
# 4-neighbour Laplacian; the offset keeps negative responses (Pillow clips to
# 0-255), which FIND_EDGES would drop, so the variance sees both edge sides.
_LAPLACIAN = ImageFilter.Kernel((3, 3), [0, 1, 0, 1, -4, 1, 0, 1, 0], scale=1, offset=128)


class ImageUnreadable(Exception):
    """The bytes cannot be turned into a preview; `reason` is a stable code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """A JPEG made from the source, without metadata."""

    content: bytes
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class PhotoRendition:
    """What one photo yields: its two previews and its quality code."""

    thumbnail: EncodedImage
    preview: EncodedImage
    quality_code: str


def render_photo(source: IO[bytes]) -> PhotoRendition:
    """Make the thumbnail and preview of a photo and judge its quality."""
    try:
        with Image.open(source, formats=PHOTO_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_SOURCE_PIXELS:
                raise ImageUnreadable("too-many-pixels")
            # JPEG decodes at 1/2, 1/4 or 1/8 scale when that still covers the
            # preview: a 48 MP photo then never sits whole in memory.
            image.draft("RGB", (PREVIEW_EDGE, PREVIEW_EDGE))
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except ImageUnreadable:
        raise
    except Image.DecompressionBombError:
        raise ImageUnreadable("too-many-pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        # Truncated, corrupt or mislabelled content: a permanent condition, so
        # it is recorded as failed rather than retried.
        raise ImageUnreadable("undecodable") from None
    preview = rgb.copy()
    preview.thumbnail((PREVIEW_EDGE, PREVIEW_EDGE), Image.Resampling.LANCZOS)
    thumbnail = preview.copy()
    thumbnail.thumbnail((THUMBNAIL_EDGE, THUMBNAIL_EDGE), Image.Resampling.LANCZOS)
    return PhotoRendition(
        thumbnail=_encode_jpeg(thumbnail),
        preview=_encode_jpeg(preview),
        # The size as taken (read before draft scaling), whatever the orientation.
        quality_code=judge_quality(preview, long_edge=max(width, height)),
    )


def judge_quality(preview: Image.Image, *, long_edge: int) -> str:
    """Return the quality code of a photo: too-small, too-dark, blurred or ok (first found)."""
    if long_edge < MIN_LONG_EDGE:
        return QUALITY_TOO_SMALL
    gray = preview.convert("L")
    if ImageStat.Stat(gray).mean[0] < MIN_MEAN_LUMINANCE:
        return QUALITY_TOO_DARK
    if ImageStat.Stat(gray.filter(_LAPLACIAN)).var[0] < MIN_EDGE_VARIANCE:
        return QUALITY_BLURRED
    return QUALITY_OK


def _encode_jpeg(image: Image.Image) -> EncodedImage:
    # A new image carries no info dict: no EXIF (GPS position, camera serial),
    # no XMP, no comments survive from the source.
    clean = Image.new("RGB", image.size)
    clean.paste(image)
    buffer = io.BytesIO()
    clean.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return EncodedImage(buffer.getvalue(), clean.width, clean.height)
