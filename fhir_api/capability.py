"""The CapabilityStatement, generated from what the server really supports."""

from __future__ import annotations

from functools import cache

from fhir_api.patches import JSON_PATCH, MERGE_PATCH, NOT_PATCHABLE
from fhir_api.search.geo import DEFAULT_NEAR_KM, KILOMETRES_PER_UNIT
from fhir_api.search.parser import UNINDEXED
from fhir_api.search_index import search_parameters_for
from fhir_api.validation import JSONObject, supported_resource_types

INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


# What /fhir/AuditEvent answers (auth.audit.router), not the generic store.
AUDIT_SEARCH_PARAMETERS = (
    ("date", "date"),
    ("patient", "reference"),
    ("entity", "reference"),
    ("agent", "reference"),
    ("action", "token"),
    ("subtype", "token"),
    ("outcome", "token"),
    ("address", "string"),
)


def _security(issuer: str | None) -> JSONObject:
    """Say how clients authenticate: SMART on FHIR bearer tokens from the OIDC issuer."""
    security: JSONObject = {
        "cors": True,
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "Bearer access tokens from the OIDC issuer (see "
        ".well-known/smart-configuration); role and care-relationship scoping apply.",
    }
    if issuer:
        protocol = issuer.rstrip("/") + "/protocol/openid-connect"
        security["extension"] = [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "token", "valueUri": f"{protocol}/token"},
                    {"url": "authorize", "valueUri": f"{protocol}/auth"},
                ],
            }
        ]
    return security


def _search_param(code: str, param_type: str) -> JSONObject:
    entry: JSONObject = {"name": code, "type": param_type}
    if param_type == "special":
        # `near`, the one R4 special parameter, leaves its details to the server.
        units = ", ".join(KILOMETRES_PER_UNIT)
        entry["documentation"] = (
            "latitude|longitude|distance|units (WGS84, great-circle distance); "
            f"units: {units} (default km); without a distance: {DEFAULT_NEAR_KM:g} km"
        )
    return entry


@cache
def capability_statement(
    base_url: str, software_version: str, issuer: str | None = None
) -> JSONObject:
    """Describe the server's REST interface for /fhir/metadata."""
    resources: list[JSONObject] = []
    revincludes: dict[str, list[str]] = {}
    for source in sorted(supported_resource_types()):
        for code, info in search_parameters_for(source).items():
            if info.type == "reference":
                for target in info.targets:
                    revincludes.setdefault(target, []).append(f"{source}:{code}")
    for resource_type in sorted(supported_resource_types()):
        parameters = sorted(search_parameters_for(resource_type).items())
        search_params = [
            _search_param(code, info.type) for code, info in parameters if code not in UNINDEXED
        ]
        references = [code for code, info in parameters if info.type == "reference"]
        entry: JSONObject = {
            "type": resource_type,
            "interaction": [
                {"code": code}
                for code in INTERACTIONS
                if not (code == "patch" and resource_type in NOT_PATCHABLE)
            ],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical", "local", "enforced"],
            "searchInclude": ["*", *(f"{resource_type}:{code}" for code in references)],
            "searchRevInclude": sorted(revincludes.get(resource_type, ())),
            "searchParam": search_params,
        }
        if resource_type == "AuditEvent":
            # The audit trail is append-only and Waha writes it: admins read and search.
            entry = {
                "type": "AuditEvent",
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": name, "type": kind} for name, kind in AUDIT_SEARCH_PARAMETERS
                ],
            }
        if resource_type == "Patient":
            entry["operation"] = [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "software": {"name": "Waha", "version": software_version},
        "implementation": {"description": "Waha FHIR R4 record store", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": [JSON_PATCH, MERGE_PATCH],
        "rest": [
            {
                "mode": "server",
                "security": _security(issuer),
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "history-system"},
                    {"code": "search-system"},
                ],
                "searchParam": [
                    {"name": "_type", "type": "token"},
                    {"name": "_id", "type": "token"},
                    {"name": "_lastUpdated", "type": "date"},
                ],
                # Patient/[id]/[type] searches the patient compartment.
                "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            }
        ],
    }
