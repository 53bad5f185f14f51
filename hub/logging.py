"""structlog configuration: JSON events to stdout, configured once per process."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import orjson
import structlog

from hub.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Configure structlog and the standard library logging for this process."""
    # orjson renders to bytes, about ten times faster than the json module:
    # every request logs a line, so it shows in an API process's CPU. Unlike
    # json.dumps, orjson refuses keys that are not strings unless told.
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps, option=orjson.OPT_NON_STR_KEYS)
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    logger_factory: Callable[..., structlog.typing.WrappedLogger] = (
        structlog.BytesLoggerFactory(sys.stdout.buffer)
        if settings.log_json
        else structlog.PrintLoggerFactory(sys.stdout)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
