"""Official HL7 FHIR R4 4.0.1 definitions shipped as package data (CC0)."""
