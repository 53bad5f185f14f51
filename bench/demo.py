"""Load the demo data set (`waha load-demo`): reference data and ~90 visits of 30 patients."""

from __future__ import annotations

from bench.demo_images import load_demo_images
from bench.loader import (
    LoadCounts,
    Writer,
    bundle_unit,
    load_reference_resources,
    submit,
    unit_context,
)
from bench.population import DEMO_SEED, demo_dataset
from hub.settings import Settings


def load_demo_data(settings: Settings, *, seed: int = DEMO_SEED) -> dict[str, int]:
    """Write the demo data in-process; idempotent (replayed bundles answer as first time)."""
    writer = Writer.from_settings(settings)
    references, bundles = demo_dataset(seed)
    reference_counts = load_reference_resources(references, writer=writer)
    visits = LoadCounts()
    for number, bundle in enumerate(bundles):
        unit = bundle_unit(bundle)
        visits.add(submit(bundle, context=unit_context(unit, f"demo-{number}"), writer=writer))
    if reference_counts.failures or visits.failures:
        errors = {**reference_counts.errors, **visits.errors}
        raise RuntimeError(f"demo data refused: {errors}")
    # The dev S3 server keeps nothing across restarts: put the images back every time.
    images = load_demo_images(settings, seed=seed)
    return {
        "reference_resources": len(references),
        "visit_bundles": visits.bundles,
        "resources_created": reference_counts.created + visits.created,
        "demo_images_uploaded": images["uploaded"],
        "demo_images_restored": images["restored"],
    }
