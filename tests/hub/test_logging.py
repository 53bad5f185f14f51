"""Log lines are JSON whatever an event carries."""

from __future__ import annotations

import json
import subprocess
import sys

LOG_ONE_EVENT = """
from decimal import Decimal
import structlog
from hub.logging import configure_logging
from hub.settings import Settings

configure_logging(Settings(env="test", log_json=True))
structlog.get_logger().info(
    "upload.parts", sizes={1: 5242880, 2: 1024}, total=Decimal("1.5"), owner=object()
)
"""


def test_json_log_line_keeps_events_with_integer_keys_and_unknown_values() -> None:
    """An event with integer keys or objects JSON cannot hold still logs one JSON line."""
    completed = subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, "-c", LOG_ONE_EVENT], capture_output=True, text=True, check=True
    )
    line = json.loads(completed.stdout)
    assert line["event"] == "upload.parts"
    assert line["sizes"] == {"1": 5242880, "2": 1024}
    assert line["total"] == "Decimal('1.5')"
    assert line["owner"].startswith("<object object")
    assert line["level"] == "info"
