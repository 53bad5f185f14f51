"""FHIR R4 REST record store: CRUD, history, conditional operations, bundles, $everything."""
