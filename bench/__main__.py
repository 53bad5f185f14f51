"""Run the API benchmarks (`make bench`): ingest, then `$everything`, then a summary table.

python -m bench [--base-url http://127.0.0.1:8000] [--token ...] [--duration 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from bench import everything, ingest
from bench.common import (
    BenchError,
    Check,
    add_http_arguments,
    check_api,
    credentials,
    print_checks,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Check the API is up, run ingest then `$everything`, print every figure against target."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Waha API benchmarks against their targets."
    )
    add_http_arguments(parser)
    ingest.add_arguments(parser)
    everything.add_arguments(parser)
    parser.add_argument(
        "--fail-on-short", action="store_true", help="exit 1 when a target is missed"
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time())
    try:
        check_api(args.base_url, token=credentials(args))
        print(f"Waha benchmarks against {args.base_url}")
        checks: list[Check] = ingest.run_all(args)
        # $everything reuses the reference data the ingest run has just put.
        everything_args = argparse.Namespace(**vars(args))
        everything_args.skip_setup = True
        checks += everything.run_all(everything_args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_checks("Summary", checks)
    short = [check.name for check in checks if not check.passed]
    print(
        f"\n{len(checks) - len(short)}/{len(checks)} targets met"
        + (f"; short: {', '.join(short)}" if short else "")
    )
    return 1 if short and args.fail_on_short else 0


if __name__ == "__main__":
    sys.exit(main())
