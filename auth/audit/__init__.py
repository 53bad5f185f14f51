"""The audit trail: one AuditEvent per request, append-only, readable by admins only."""
