"""Write bundles in-process through `fhir_api.service.process_bundle`, one transaction each."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from bench.population import JSONObject
from fhir_api.context import SYSTEM_CONTEXT, RequestContext
from fhir_api.service import BundleLimits, process_bundle
from fhir_api.writes import WriteSettings
from hub.db import session_scope
from hub.errors import WahaError
from hub.settings import Settings

# Deadlocks and serialization failures between concurrent writers are retried, as a
# unit would retry its bundle; anything else is reported.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
MAX_ATTEMPTS = 4
REFERENCE_CHUNK = 500


@dataclass
class LoadCounts:
    """What a load wrote and what it could not."""

    bundles: int = 0
    created: int = 0
    entries: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, other: LoadCounts) -> None:
        """Add another load's counts to these."""
        self.bundles += other.bundles
        self.created += other.created
        self.entries += other.entries
        self.failures += other.failures
        for error, count in other.errors.items():
            self.errors[error] = self.errors.get(error, 0) + count

    def as_dict(self) -> dict[str, int]:
        """Return the counts for printing."""
        return {
            "bundles": self.bundles,
            "created": self.created,
            "entries": self.entries,
            "failures": self.failures,
        }


@dataclass(frozen=True)
class Writer:
    """What `process_bundle` needs besides the bundle, derived once from the settings."""

    write: WriteSettings
    limits: BundleLimits

    @classmethod
    def from_settings(cls, settings: Settings) -> Writer:
        """Mirror the API's own write settings and limits."""
        return cls(
            write=WriteSettings(
                base_url=settings.fhir_base_url,
                enforce_referential_integrity=settings.enforce_referential_integrity,
            ),
            limits=BundleLimits(
                max_entries=settings.max_bundle_entries,
                idempotency_wait_seconds=settings.idempotency_wait_seconds,
            ),
        )


def unit_context(unit_id: str, request_id: str) -> RequestContext:
    """Return the context of a unit client sending a bundle (as its token will say)."""
    return RequestContext(
        client_id=unit_id, author=f"Device/{unit_id}", request_id=request_id, unit=unit_id
    )


def bundle_unit(bundle: JSONObject) -> str:
    """Return the unit that sent a visit bundle: its Encounter's serviceProvider."""
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Encounter":
            return str(resource["serviceProvider"]["reference"]).removeprefix("Organization/")
    raise ValueError("a unit bundle has an Encounter")


def reference_bundles(
    resources: Sequence[JSONObject], *, chunk: int = REFERENCE_CHUNK
) -> list[JSONObject]:
    """Return transaction Bundles that PUT the resources at their ids, in order."""
    return [
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": resource,
                    "request": {
                        "method": "PUT",
                        "url": f"{resource['resourceType']}/{resource['id']}",
                    },
                }
                for resource in resources[start : start + chunk]
            ],
        }
        for start in range(0, len(resources), chunk)
    ]


def _created(response: JSONObject) -> int:
    return sum(
        1
        for entry in response.get("entry", [])
        if str(entry.get("response", {}).get("status", "")).startswith("201")
    )


def submit(bundle: JSONObject, *, context: RequestContext, writer: Writer) -> LoadCounts:
    """Write one bundle in its own transaction, retrying deadlocks; never raise for refusals."""
    counts = LoadCounts(bundles=1, entries=len(bundle.get("entry", [])))
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with session_scope() as session:
                status, response = process_bundle(
                    session, bundle, context=context, settings=writer.write, limits=writer.limits
                )
        except WahaError as error:
            counts.failures = 1
            counts.errors[f"{error.status} {error.slug}"] = 1
            return counts
        except DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate in RETRYABLE_SQLSTATES and attempt < MAX_ATTEMPTS:
                continue
            counts.failures = 1
            counts.errors[f"database {sqlstate or type(error.orig).__name__}"] = 1
            return counts
        if status >= 300:
            counts.failures = 1
            counts.errors[f"{status}"] = 1
        else:
            counts.created = _created(response)
        return counts
    return counts


def load_reference_resources(resources: Sequence[JSONObject], *, writer: Writer) -> LoadCounts:
    """PUT reference resources as system transactions of at most REFERENCE_CHUNK entries."""
    counts = LoadCounts()
    for bundle in reference_bundles(resources):
        counts.add(submit(bundle, context=SYSTEM_CONTEXT, writer=writer))
    return counts
