"""R4's required code bindings: a `code` element must hold a code of its value set.

The R4B models check structure and primitive formats, not value sets, so
`Patient.gender = "robot"` passed them. The checks come from the official
definitions (`fhir_api/definitions/required-codes.json`, built from
hl7.fhir.r4.core 4.0.1 by `platform/scripts/required_codes.py`): for every
type, which of its elements are bound codes and which lead to more of them.
Value sets whose codes cannot be listed (MIME types, ISO 4217 currencies) are
not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson

from hub.errors import Issue

MAX_ISSUES = 50
# Small value sets are named in full in the message; larger ones by URL only.
LISTED_CODES = 12


@dataclass(frozen=True, slots=True)
class _Checks:
    # type or backbone path -> JSON name -> ("code", value set) | ("type", name) | ("resource",)
    fields: dict[str, dict[str, tuple[str, ...]]]
    codes: dict[str, frozenset[str]]


@cache
def _checks() -> _Checks:
    source = resources.files("fhir_api.definitions") / "required-codes.json"
    document = orjson.loads(source.read_bytes())
    fields = {
        name: {field: tuple(entry) for field, entry in entries.items()}
        for name, entries in document["types"].items()
    }
    codes = {url: frozenset(listed) for url, listed in document["valueSets"].items()}
    return _Checks(fields, codes)


def code_issues(resource: dict[str, Any]) -> list[Issue]:
    """Return an issue for every bound code of `resource` that is not in its value set."""
    issues: list[Issue] = []
    resource_type = resource.get("resourceType")
    if isinstance(resource_type, str):
        _walk(_checks(), resource, resource_type, resource_type, issues)
    return issues


def _walk(
    checks: _Checks, node: dict[str, Any], type_name: str, path: str, issues: list[Issue]
) -> None:
    fields = checks.fields.get(type_name)
    if fields is None:
        return
    for key, value in node.items():
        entry = fields.get(key)
        if entry is None:
            continue
        repeated = isinstance(value, list)
        for position, item in enumerate(value if repeated else (value,)):
            if len(issues) >= MAX_ISSUES:
                return
            where = f"{path}.{key}[{position}]" if repeated else f"{path}.{key}"
            if entry[0] == "code":
                allowed = checks.codes[entry[1]]
                if isinstance(item, str) and item not in allowed:
                    issues.append(Issue("code-invalid", _message(where, item, entry[1]), where))
            elif not isinstance(item, dict):
                continue
            elif entry[0] == "type":
                _walk(checks, item, entry[1], where, issues)
            elif isinstance(item.get("resourceType"), str):
                _walk(checks, item, item["resourceType"], where, issues)


def _message(where: str, code: str, value_set: str) -> str:
    allowed = _checks().codes[value_set]
    listing = f" ({', '.join(sorted(allowed))})" if len(allowed) <= LISTED_CODES else ""
    return f"{where}: {code!r} is not a code of {value_set}{listing}, which R4 requires"
