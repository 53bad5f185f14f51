"""Index-key encodings shared by ingest (extraction) and search (query building).

Every function here is used on both sides, so a value written at ingest and
the same value typed in a search URL always produce identical keys.
"""

from __future__ import annotations

import calendar
import functools
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

DATE_MIN = datetime.min.replace(tzinfo=UTC)
DATE_MAX = datetime.max.replace(tzinfo=UTC)
DECIMAL_MIN = Decimal("-Infinity")
DECIMAL_MAX = Decimal("Infinity")

# Arabic letters that NFKD leaves apart but people write interchangeably:
# alef wasla -> alef, alef maksura and Persian yeh -> yeh, teh marbuta -> heh
# (فاطمة / فاطمه, مصطفى / مصطفي are the same name in Maghreb registries),
# and the tatweel used only to stretch words is dropped.
_ARABIC_FOLDING = str.maketrans({"ٱ": "ا", "ى": "ي", "ی": "ي", "ة": "ه", "ـ": None})


def normalize_string(value: str) -> str:
    """Normalise a string for indexing and for search input alike."""
    if value.isascii():
        return " ".join(value.casefold().split())
    decomposed = unicodedata.normalize("NFKD", value)
    # Dropping combining marks (Mn) removes accents and Arabic hamza/harakat.
    stripped = "".join(char for char in decomposed if unicodedata.category(char) != "Mn")
    return " ".join(stripped.translate(_ARABIC_FOLDING).casefold().split())


@functools.lru_cache(maxsize=16384)
def string_entries(
    param: str, value: str, *, words: bool = True
) -> tuple[tuple[str, str, str], ...]:
    """Return the string-index rows of one value: the whole value, then each of its words."""
    # Cached: code displays and place names repeat across most resources.
    normalized = normalize_string(value)
    if not normalized:
        return ()
    entries = [(param, normalized, value)]
    parts = normalized.split(" ") if words else []
    if len(parts) > 1:
        # Each word keeps the whole value as `exact`, so `:exact` still
        # matches only the full part while `name=idrissi` finds "El Idrissi".
        entries.extend((param, word, value) for word in parts)
    return tuple(entries)


def encode_token(param: str, system: str | None, code: str) -> list[str]:
    """Return the token index keys of one (system, code) pair."""
    keys = [f"{param}={system or ''}|{code}", f"{param}={code}"]
    if system:
        keys.append(f"{param}={system}|")
    return keys


def token_query_key(param: str, value: str) -> str:
    """Return the index key a token search value (`code`, `sys|code`, `|code`, `sys|`) matches."""
    return f"{param}={value}"


def of_type_key(param: str, type_system: str | None, type_code: str, value: str) -> str:
    """Return the `:of-type` key of an Identifier (also the query key of `param:of-type=`)."""
    return f"{param}:of-type={type_system or ''}|{type_code}|{value}"


def text_param(param: str) -> str:
    """Return the string-index param holding a token's text (`:text` modifier)."""
    return f"{param}:text"


def composite_token_keys(system: str | None, code: str) -> list[str]:
    """Return the forms a token component takes inside composite keys."""
    return [f"{system or ''}|{code}", code]


def composite_key(param: str, *components: str) -> str:
    """Return a composite index key; `components` are the `$`-separated parts."""
    return f"{param}={'$'.join(components)}"


def composite_param(param: str, *prefix: str) -> str:
    """Return the param under which a composite's last (typed) component is indexed."""
    return "$".join((param, *prefix))


def position_params(param: str) -> tuple[str, str]:
    """Return the params under which a position's latitude and longitude are indexed."""
    return f"{param}$latitude", f"{param}$longitude"


def position_value(latitude: Decimal, longitude: Decimal) -> tuple[Decimal, Decimal] | None:
    """Return a position as indexed: None off the globe, a longitude past ±180 wrapped."""
    if not -90 <= latitude <= 90:
        return None
    if -180 <= longitude <= 180:
        return latitude, longitude
    # R4 does not bound the decimals: 190° is where -170° is. Decimal's % keeps the
    # dividend's sign, as PostgreSQL's does (migration 0022 wraps alike).
    return latitude, ((longitude + 180) % 360 + 360) % 360 - 180


_RELATIVE_REFERENCE = re.compile(
    r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)
_ABSOLUTE_REFERENCE = re.compile(
    r"/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


def reference_value(reference: str) -> str | None:
    """Return the indexed form of a Reference.reference string, or None for local ones."""
    reference = reference.strip()
    if not reference or reference.startswith("#"):
        # Contained resources are not separately indexed.
        return None
    match = _RELATIVE_REFERENCE.match(reference)
    if match is not None:
        return f"{match.group(1)}/{match.group(2)}"
    return reference


def server_path(reference: str, base_url: str) -> str | None:
    """Return what follows `base_url` in a URL naming this server, else None.

    The URL names this server whatever the case of its scheme and host, over
    http or https, and with doubled slashes after the base (RFC 3986 6.2.2).
    """
    if not base_url or "://" not in reference:
        return None
    if reference.startswith(base_url + "/"):
        return reference[len(base_url) + 1 :].lstrip("/")
    base, given = urlsplit(base_url), urlsplit(reference.strip())
    base_path = base.path.rstrip("/")
    if (
        given.scheme.lower() in ("http", "https")
        and given.netloc.lower() == base.netloc.lower()
        and given.path.startswith(base_path + "/")
        and not given.query
        and not given.fragment
    ):
        return given.path[len(base_path) :].lstrip("/")
    return None


def local_reference(reference: str, base_url: str) -> str | None:
    """Return `Type/id[/_history/v]` for a reference to this server's absolute URL, else None."""
    local = server_path(reference, base_url)
    return local if local is not None and _RELATIVE_REFERENCE.match(local) else None


def localized(node: Any, base_url: str) -> Any:
    """Return a copy of `node` with every Reference.reference to `base_url` made relative."""
    if isinstance(node, dict):
        out = {key: localized(value, base_url) for key, value in node.items()}
        reference = node.get("reference")
        if isinstance(reference, str):
            out["reference"] = local_reference(reference, base_url) or reference
        return out
    if isinstance(node, list):
        return [localized(item, base_url) for item in node]
    return node


def reference_type(reference: str) -> str | None:
    """Return the resource type a reference string points at, when it says so."""
    match = _RELATIVE_REFERENCE.match(reference) or _ABSOLUTE_REFERENCE.search(reference)
    return match.group(1) if match is not None else None


def reference_query_keys(param: str, value: str, targets: tuple[str, ...]) -> list[str]:
    """Return the keys matching a reference search value (`Type/id`, bare `id` or URL)."""
    if "/" in value or ":" in value:
        stripped = reference_value(value)
        return [f"{param}={stripped or value}"]
    # A bare id means that id in any of the parameter's target types.
    return [f"{param}={target}/{value}" for target in targets]


def canonical_values(url: str) -> list[str]:
    """Return the indexed forms of a canonical URL: without `|version`, and as given."""
    base, bar, _version = url.partition("|")
    return [base, url] if bar else [url]


_DATE_ONLY = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
# Width of the interval a value covers, minus the last microsecond (high is inclusive).
_MINUTE_WIDTH = timedelta(seconds=59, microseconds=999999)
_SECOND_WIDTH = timedelta(microseconds=999999)
_FRACTION_WIDTHS = {digits: timedelta(microseconds=10 ** (6 - digits) - 1) for digits in range(7)}


def date_range(value: str) -> tuple[datetime, datetime] | None:
    """Return the UTC [low, high] a FHIR date/dateTime/instant covers, by its precision."""
    if len(value) <= 10:
        match = _DATE_ONLY.match(value)
        return _date_only_range(match) if match is not None else None
    # Positions are fixed by the FHIR dateTime grammar: YYYY-MM-DDThh:mm[:ss[.f+]][zone].
    if value[10] != "T" or value[13:14] != ":":
        return None
    if value[16:17] != ":":
        width = _MINUTE_WIDTH
    elif value[19:20] == ".":
        end = 20
        while end < len(value) and value[end].isdigit():
            end += 1
        width = _FRACTION_WIDTHS[min(end - 20, 6)]
    else:
        width = _SECOND_WIDTH
    try:
        # fromisoformat is C code; it also validates every field.
        low = datetime.fromisoformat(value)
        if low.tzinfo is None:
            # A dateTime without a zone is read as UTC (the server has no local zone).
            low = low.replace(tzinfo=UTC)
        elif low.utcoffset():
            low = low.astimezone(UTC)
        else:
            low = low.replace(tzinfo=UTC)
        return low, low + width
    except (ValueError, OverflowError):
        return None


def _date_only_range(match: re.Match[str]) -> tuple[datetime, datetime] | None:
    """Return the range of a year, year-month or full date (UTC days)."""
    try:
        return _calendar_range(*match.groups())
    except ValueError:
        return None


def _calendar_range(
    year_text: str, month_text: str | None, day_text: str | None
) -> tuple[datetime, datetime]:
    year = int(year_text)
    if month_text is None:
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year, 12, 31, 23, 59, 59, 999999, UTC)
    month = int(month_text)
    if day_text is None:
        last_day = calendar.monthrange(year, month)[1]
        low = datetime(year, month, 1, tzinfo=UTC)
        return low, datetime(year, month, last_day, 23, 59, 59, 999999, tzinfo=UTC)
    day = int(day_text)
    low = datetime(year, month, day, tzinfo=UTC)
    return low, datetime(year, month, day, 23, 59, 59, 999999, tzinfo=UTC)


def to_decimal(value: object) -> Decimal | None:
    """Return a JSON number as a Decimal, keeping the digits it was written with."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, int | float | str):
        try:
            # repr() of a float is its shortest round-tripping form: 5.4 stays 5.4.
            number = Decimal(repr(value) if isinstance(value, float) else value)
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def number_bounds(value: object) -> tuple[Decimal, Decimal, Decimal] | None:
    """Return (value, low, high) of a JSON number, low/high from its written precision."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return _cached_number_bounds(value)
    number = to_decimal(value)
    return None if number is None else (number, *decimal_range(number))


# typed=True: 5 and 5.0 are equal keys but not the same precision. Decimals are
# not cached, since Decimal("5.4") == Decimal("5.40") would share one entry.
@functools.lru_cache(maxsize=16384, typed=True)
def _cached_number_bounds(value: int | float | str) -> tuple[Decimal, Decimal, Decimal] | None:
    number = to_decimal(value)
    return None if number is None else (number, *decimal_range(number))


def decimal_range(value: Decimal) -> tuple[Decimal, Decimal]:
    """Return the [low, high] implied by a decimal's precision (5.4 -> 5.35..5.45)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        return value, value
    half = Decimal(5).scaleb(exponent - 1)
    return value - half, value + half
