"""The demo photos of `make run`: Binaries with their Media, restored when S3 loses them."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient
from minio import Minio
from sqlalchemy import Engine

from bench.demo import load_demo_data
from hub.settings import Settings
from tests.imaging_store.conftest import stored_keys


def test_demo_photos_are_visible_and_come_back_after_the_store_forgets_them(
    app: FastAPI,
    settings: Settings,
    committed: Engine,
    s3: Minio,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    counts = load_demo_data(settings)
    assert counts["demo_images_uploaded"] == 3
    unit = auth_headers("unit-01")
    with TestClient(app, raise_server_exceptions=False, headers=unit) as client:
        bundle = client.get("/fhir/Media?_count=10").json()
        urls = [entry["resource"]["content"]["url"] for entry in bundle["entry"]]
        assert len(urls) == 3
        photo = client.get(f"/fhir/{urls[0]}")
        assert photo.status_code == 200
        assert photo.headers["content-type"] == "image/jpeg"
        # The dev S3 server keeps nothing across restarts; the next start restores it.
        for key in stored_keys(s3, settings):
            s3.remove_object(settings.s3_bucket, key)
        assert client.get(f"/fhir/{urls[0]}").status_code != 200
        again = load_demo_data(settings)
        assert (again["demo_images_uploaded"], again["demo_images_restored"]) == (0, 3)
        assert client.get(f"/fhir/{urls[0]}").content == photo.content
        # Another unit has no care relationship with this patient: its photos are not its own.
        other = client.get(f"/fhir/{urls[0]}", headers=auth_headers("unit-02"))
        assert other.status_code == 404
