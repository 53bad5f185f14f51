"""Derivatives of stored Binaries: previews, photo quality checks and DICOM study metadata."""
