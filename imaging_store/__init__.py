"""Imaging store: FHIR Binary bytes in S3-compatible object storage, metadata in PostgreSQL."""
