"""The application factory's process-wide set-up."""

from __future__ import annotations

import gc

from fastapi import FastAPI


def test_start_up_objects_are_frozen_out_of_the_collector(app: FastAPI) -> None:
    # The R4 definitions and models built at start-up would otherwise be
    # walked by every full collection, with the worker's requests waiting.
    assert isinstance(app, FastAPI)
    assert gc.get_freeze_count() > 100_000
