"""Composition root of Waha: settings, database, app factory, Celery app and CLI."""
