"""Build fhir_api/definitions/required-codes.json from the HL7 package hl7.fhir.r4.core 4.0.1.

Usage: python platform/scripts/required_codes.py <unpacked package folder> [output]

Every element of type `code` that R4 binds `required` to a value set whose codes
can be listed (concepts named, or whole code systems the package holds
complete) becomes a check; the element tree is kept only where it leads to one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BASE = "http://hl7.org/fhir/StructureDefinition/"
DEFAULT_OUTPUT = (
    Path(__file__).resolve().parents[2] / "fhir_api" / "definitions" / "required-codes.json"
)


class Unlistable(Exception):
    """A value set whose codes cannot be enumerated from the package."""


def _load(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    structures: dict[str, Any] = {}
    value_sets: dict[str, Any] = {}
    code_systems: dict[str, Any] = {}
    for path in sorted(folder.glob("*.json")):
        document = json.loads(path.read_text())
        kind = document.get("resourceType")
        if kind == "StructureDefinition" and document.get("derivation") == "specialization":
            if document["kind"] in ("resource", "complex-type") and not document.get("abstract"):
                structures[document["type"]] = document
            elif document["type"] in ("Element", "BackboneElement", "Resource", "DomainResource"):
                structures[document["type"]] = document
        elif kind == "ValueSet":
            value_sets[document["url"]] = document
        elif kind == "CodeSystem":
            code_systems[document["url"]] = document
    return structures, value_sets, code_systems


def _concepts(concepts: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(code, codes below it) for every concept of a hierarchy."""
    found: list[tuple[str, list[str]]] = []
    for concept in concepts:
        below = _concepts(concept.get("concept", []))
        found.append((concept["code"], [code for code, _ in below]))
        found.extend(below)
    return found


def _system_codes(code_systems: dict[str, Any], url: str) -> list[tuple[str, list[str]]]:
    system = code_systems.get(url)
    if system is None or system.get("content") != "complete" or not system.get("concept"):
        raise Unlistable(url)
    return _concepts(system["concept"])


def _include(
    part: dict[str, Any], value_sets: dict[str, Any], code_systems: dict[str, Any]
) -> set[str]:
    codes: set[str] | None = None
    if "system" in part:
        if part.get("concept"):
            codes = {concept["code"] for concept in part["concept"]}
        else:
            hierarchy = _system_codes(code_systems, part["system"])
            codes = {code for code, _ in hierarchy}
            for rule in part.get("filter", []):
                if rule.get("property") != "concept" or rule.get("op") not in (
                    "is-a",
                    "descendent-of",
                ):
                    raise Unlistable(f"{part['system']} filter {rule}")
                below = dict(hierarchy).get(rule["value"])
                if below is None:
                    raise Unlistable(f"{part['system']} has no {rule['value']}")
                kept = set(below) | ({rule["value"]} if rule["op"] == "is-a" else set())
                codes &= kept
    for url in part.get("valueSet", []):
        imported = _expand(url, value_sets, code_systems)
        codes = imported if codes is None else codes & imported
    if codes is None:
        raise Unlistable(f"include {part}")
    return codes


def _expand(url: str, value_sets: dict[str, Any], code_systems: dict[str, Any]) -> set[str]:
    value_set = value_sets.get(url.split("|")[0])
    if value_set is None or "compose" not in value_set:
        raise Unlistable(url)
    codes: set[str] = set()
    for part in value_set["compose"].get("include", []):
        codes |= _include(part, value_sets, code_systems)
    for part in value_set["compose"].get("exclude", []):
        if "system" not in part or not part.get("concept"):
            raise Unlistable(f"{url} exclude")
        codes -= {concept["code"] for concept in part["concept"]}
    return codes


def _children(elements: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    depth = path.count(".") + 1
    return [
        element
        for element in elements
        if element["path"].startswith(path + ".") and element["path"].count(".") == depth
    ]


def build(folder: Path) -> dict[str, Any]:
    """Return the checks: element trees per type and the listed codes per value set."""
    structures, value_sets, code_systems = _load(folder)
    listed: dict[str, list[str]] = {}
    unlistable: set[str] = set()
    nodes: dict[str, dict[str, list[str]]] = {}

    def codes_of(url: str) -> str | None:
        url = url.split("|")[0]
        if url in listed:
            return url
        if url in unlistable:
            return None
        try:
            listed[url] = sorted(_expand(url, value_sets, code_systems))
        except Unlistable:
            unlistable.add(url)
            return None
        return url

    def node(name: str, elements: list[dict[str, Any]], path: str) -> None:
        fields: dict[str, list[str]] = {}
        nodes[name] = fields
        for element in _children(elements, path):
            last = element["path"].rsplit(".", 1)[1]
            if "contentReference" in element:
                fields[last] = ["type", element["contentReference"].lstrip("#")]
                continue
            types = [kind["code"] for kind in element.get("type", [])]
            choice = last.endswith("[x]")
            for kind in types:
                json_name = last[:-3] + kind[0].upper() + kind[1:] if choice else last
                binding = element.get("binding", {})
                if kind == "code" and binding.get("strength") == "required":
                    url = codes_of(binding.get("valueSet", ""))
                    if url is not None:
                        fields[json_name] = ["code", url]
                elif kind in ("BackboneElement", "Element") and _children(
                    elements, element["path"]
                ):
                    node(element["path"], elements, element["path"])
                    fields[json_name] = ["type", element["path"]]
                elif kind == "Resource":
                    fields[json_name] = ["resource"]
                elif kind in structures and kind[0].isupper():
                    fields[json_name] = ["type", kind]

    for name, structure in structures.items():
        if name in ("Element", "BackboneElement", "Resource", "DomainResource"):
            continue
        elements = structure["snapshot"]["element"]
        node(name, elements, elements[0]["path"])

    # Keep only what leads to a check.
    useful: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, fields in nodes.items():
            if name in useful:
                continue
            if any(
                entry[0] in ("code", "resource") or (entry[0] == "type" and entry[1] in useful)
                for entry in fields.values()
            ):
                useful.add(name)
                changed = True
    types = {
        name: {
            field: entry
            for field, entry in sorted(fields.items())
            if entry[0] in ("code", "resource") or entry[1] in useful
        }
        for name, fields in sorted(nodes.items())
        if name in useful
    }
    used = {
        entry[1] for fields in types.values() for entry in fields.values() if entry[0] == "code"
    }
    return {
        "source": "hl7.fhir.r4.core 4.0.1 (CC0-1.0), built by platform/scripts/required_codes.py",
        "valueSets": {url: listed[url] for url in sorted(used)},
        "types": types,
    }


def main() -> None:
    """Write the checks file."""
    folder = Path(sys.argv[1])
    output = Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_OUTPUT
    checks = build(folder)
    output.write_text(json.dumps(checks, indent=0, sort_keys=False, ensure_ascii=False) + "\n")
    sys.stdout.write(
        f"{output}: {len(checks['types'])} types, {len(checks['valueSets'])} value sets\n"
    )


if __name__ == "__main__":
    main()
