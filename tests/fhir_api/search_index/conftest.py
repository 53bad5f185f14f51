"""Shared fixtures of the search-index tests: the sample resources (no database)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "fixtures" / "fhir-samples"


def iter_sample_resources() -> Iterator[dict[str, Any]]:
    """Yield every resource of the sample bundles and NDJSON files, decimals exact."""
    for path in sorted(SAMPLES.glob("*/*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
        for entry in bundle.get("entry", ()):
            if "resource" in entry:
                yield entry["resource"]
    for path in sorted(SAMPLES.glob("*/*.ndjson")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line, parse_float=Decimal)


@pytest.fixture(scope="session")
def sample_resources() -> list[dict[str, Any]]:
    """Return all sample resources (thousands; read once per session)."""
    if not SAMPLES.is_dir():
        pytest.skip("tests/fixtures/fhir-samples is missing")
    return list(iter_sample_resources())


@pytest.fixture(scope="session")
def first_of_type(sample_resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the first sample resource of each type."""
    found: dict[str, dict[str, Any]] = {}
    for resource in sample_resources:
        found.setdefault(resource["resourceType"], resource)
    return found
