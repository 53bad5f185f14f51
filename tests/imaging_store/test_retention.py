"""Retention of Binary objects: the purge, the orphan sweep and Media deletions.

Uploads and reads go through the HTTP API into the real local S3 server and
PostgreSQL; the retention functions run in the same rolled-back transaction.
Until migration 0011 adds `binary_link`, tests that need links create a
temporary table of the shape the retention queries read (it vanishes with the
test's transaction).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from minio import Minio
from sqlalchemy import text
from sqlalchemy.orm import Session

from fhir_api.writes import WriteSettings
from hub.celery_app import celery_app
from hub.db import session_scope
from hub.settings import Settings
from imaging_store import repository, retention, retention_tasks
from imaging_store.derivatives import service as derivatives_service
from imaging_store.errors import StorageUnavailable
from imaging_store.service import binary_storage
from imaging_store.storage import BinaryStorage, StorageConfig
from tests.builders import patient
from tests.imaging_store import samples
from tests.imaging_store.conftest import free_port

RETENTION = timedelta(days=30)
ORPHAN_AGE = timedelta(hours=72)


def _upload(client: TestClient, content: bytes, content_type: str, **headers: str) -> str:
    response = client.post(
        "/fhir/Binary", content=content, headers={"Content-Type": content_type, **headers}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _keys(s3: Minio, settings: Settings, binary_id: str) -> set[str]:
    keys = set()
    for prefix in (f"binaries/{binary_id}", f"derivatives/{binary_id}/"):
        keys |= {
            str(item.object_name)
            for item in s3.list_objects(settings.s3_bucket, prefix=prefix, recursive=True)
        }
    return keys


def _row_count(session: Session, table: str, binary_id: str) -> int:
    column = "id" if table == "binary_object" else "binary_id"
    return int(
        session.execute(
            text(f"SELECT count(*) FROM {table} WHERE {column} = :id"),  # noqa: S608 - fixed names
            {"id": binary_id},
        ).scalar_one()
    )


def _history_methods(client: TestClient, binary_id: str) -> list[str]:
    history = client.get(f"/fhir/Binary/{binary_id}/_history")
    assert history.status_code == 200, history.text
    return [entry["request"]["method"] for entry in history.json()["entry"]]


@pytest.fixture
def storage(settings: Settings) -> BinaryStorage:
    """The object store of the test app."""
    return binary_storage(settings)


@pytest.fixture
def down_storage(settings: Settings) -> BinaryStorage:
    """An object store client whose endpoint is a closed port."""
    return BinaryStorage(
        StorageConfig(
            endpoint=f"127.0.0.1:{free_port()}",
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=False,
            region=settings.s3_region,
            bucket=settings.s3_bucket,
            connect_timeout_seconds=0.5,
        )
    )


@pytest.fixture
def link_table(session: Session) -> Callable[[str, str, str], None]:
    """Return `link(binary_id, type, id)`: record a citing resource as the linker does."""

    def link(binary_id: str, resource_type: str, resource_id: str) -> None:
        repository.put_binary_link(
            session,
            binary_id=binary_id,
            resource_type=resource_type,
            resource_id=resource_id,
            patient_id=None,
        )

    return link


def _with_derivatives(
    session: Session, settings: Settings, storage: BinaryStorage, binary_id: str
) -> None:
    derivatives_service.make_derivatives(
        session,
        storage=storage,
        binary_id=binary_id,
        write_settings=WriteSettings(base_url=settings.fhir_base_url),
    )


def test_purge_removes_objects_and_rows_after_retention_and_keeps_history(
    client: TestClient,
    session: Session,
    settings: Settings,
    storage: BinaryStorage,
    s3: Minio,
    auth_headers: Callable[[str], dict[str, str]],
) -> None:
    binary_id = _upload(client, samples.png(64, 64), "image/png")
    _with_derivatives(session, settings, storage, binary_id)
    assert len(_keys(s3, settings, binary_id)) == 3  # the object, a thumbnail, a preview
    assert client.delete(f"/fhir/Binary/{binary_id}").status_code == 204
    assert client.get(f"/fhir/Binary/{binary_id}").status_code == 410

    later = datetime.now(UTC) + RETENTION + timedelta(hours=1)
    purged = retention.purge_deleted_binaries(
        session, storage=storage, now=later, retention=RETENTION, limit=100
    )

    assert purged == 1
    assert _keys(s3, settings, binary_id) == set()
    assert _row_count(session, "binary_object", binary_id) == 0
    assert _row_count(session, "binary_derivative", binary_id) == 0
    # Still gone to readers, and its history says it existed and was deleted.
    assert client.get(f"/fhir/Binary/{binary_id}").status_code == 410
    assert _history_methods(client, binary_id) == ["DELETE", "POST"]
    # Its first version named bytes that are gone: gone too.
    assert client.get(f"/fhir/Binary/{binary_id}/_history/1").status_code == 410
    # A unit learns nothing of a purged Binary, deleting it either.
    unit_02 = auth_headers("unit-02")
    assert client.delete(f"/fhir/Binary/{binary_id}", headers=unit_02).status_code == 404
    # A second run finds nothing left to do.
    assert (
        retention.purge_deleted_binaries(
            session, storage=storage, now=later, retention=RETENTION, limit=100
        )
        == 0
    )


def test_purge_keeps_binaries_deleted_within_retention_and_live_ones(
    client: TestClient, session: Session, settings: Settings, storage: BinaryStorage, s3: Minio
) -> None:
    deleted_id = _upload(client, samples.png(), "image/png")
    live_id = _upload(client, samples.png(), "image/png")
    assert client.delete(f"/fhir/Binary/{deleted_id}").status_code == 204

    purged = retention.purge_deleted_binaries(
        session,
        storage=storage,
        now=datetime.now(UTC) + RETENTION - timedelta(hours=1),
        retention=RETENTION,
        limit=100,
    )

    assert purged == 0
    assert _keys(s3, settings, deleted_id) == {f"binaries/{deleted_id}"}
    assert _row_count(session, "binary_object", deleted_id) == 1
    assert client.get(f"/fhir/Binary/{live_id}").status_code == 200


def test_purge_honours_its_limit(
    client: TestClient, session: Session, storage: BinaryStorage
) -> None:
    for _ in range(3):
        binary_id = _upload(client, samples.png(), "image/png")
        assert client.delete(f"/fhir/Binary/{binary_id}").status_code == 204
    later = datetime.now(UTC) + RETENTION * 2
    first = retention.purge_deleted_binaries(
        session, storage=storage, now=later, retention=RETENTION, limit=2
    )
    second = retention.purge_deleted_binaries(
        session, storage=storage, now=later, retention=RETENTION, limit=2
    )
    assert (first, second) == (2, 1)


def test_store_down_during_purge_deletes_nothing_and_raises_for_retry(
    client: TestClient,
    session: Session,
    settings: Settings,
    down_storage: BinaryStorage,
    s3: Minio,
) -> None:
    binary_id = _upload(client, samples.png(), "image/png")
    assert client.delete(f"/fhir/Binary/{binary_id}").status_code == 204

    # The task's unit of work: session_scope rolls back when the store fails.
    with pytest.raises(StorageUnavailable), session_scope() as scoped:
        retention.purge_deleted_binaries(
            scoped,
            storage=down_storage,
            now=datetime.now(UTC) + RETENTION * 2,
            retention=RETENTION,
            limit=100,
        )

    assert _row_count(session, "binary_object", binary_id) == 1
    assert _keys(s3, settings, binary_id) == {f"binaries/{binary_id}"}
    # The tasks retry on exactly this error.
    for task in (retention_tasks.purge_deleted_binaries, retention_tasks.sweep_orphan_binaries):
        assert StorageUnavailable in getattr(task, "autoretry_for")  # noqa: B009 - not in the stubs


def test_orphans_older_than_the_age_are_swept_recent_linked_and_attributed_ones_kept(
    client: TestClient,
    session: Session,
    settings: Settings,
    storage: BinaryStorage,
    s3: Minio,
    link_table: Callable[[str, str, str], None],
) -> None:
    patient_id = client.post("/fhir/Patient", json=patient()).json()["id"]
    orphan_id = _upload(client, samples.png(32, 32), "image/png")
    _with_derivatives(session, settings, storage, orphan_id)
    linked_id = _upload(client, samples.png(), "image/png")
    link_table(linked_id, "Media", "m1")
    attributed_id = _upload(
        client, samples.png(), "image/png", **{"X-Security-Context": f"Patient/{patient_id}"}
    )
    recent_id = _upload(client, samples.png(), "image/png")
    # Uploaded an hour after the others: still within the orphan age then.
    session.execute(
        text(
            "UPDATE binary_object SET created_at = created_at + interval '2 hours' WHERE id = :id"
        ),
        {"id": recent_id},
    )

    swept = retention.sweep_orphan_binaries(
        session,
        storage=storage,
        now=datetime.now(UTC) + ORPHAN_AGE + timedelta(hours=1),
        max_age=ORPHAN_AGE,
        limit=100,
        base_url=settings.fhir_base_url,
    )

    assert swept == 1
    assert _keys(s3, settings, orphan_id) == set()
    assert _row_count(session, "binary_object", orphan_id) == 0
    assert _row_count(session, "binary_derivative", orphan_id) == 0
    assert client.get(f"/fhir/Binary/{orphan_id}").status_code == 410
    assert _history_methods(client, orphan_id) == ["DELETE", "POST"]
    for kept in (linked_id, attributed_id, recent_id):
        assert client.get(f"/fhir/Binary/{kept}").status_code == 200
        assert _keys(s3, settings, kept) == {f"binaries/{kept}"}


def test_store_down_during_the_sweep_deletes_nothing(
    client: TestClient,
    session: Session,
    settings: Settings,
    down_storage: BinaryStorage,
    s3: Minio,
    link_table: Callable[[str, str, str], None],
) -> None:
    orphan_id = _upload(client, samples.png(), "image/png")
    with pytest.raises(StorageUnavailable), session_scope() as scoped:
        retention.sweep_orphan_binaries(
            scoped,
            storage=down_storage,
            now=datetime.now(UTC) + ORPHAN_AGE * 2,
            max_age=ORPHAN_AGE,
            limit=100,
            base_url=settings.fhir_base_url,
        )
    assert client.get(f"/fhir/Binary/{orphan_id}").status_code == 200
    assert _history_methods(client, orphan_id) == ["POST"]
    assert _keys(s3, settings, orphan_id) == {f"binaries/{orphan_id}"}


def _all_keys(s3: Minio, settings: Settings) -> set[str]:
    return {str(item.object_name) for item in s3.list_objects(settings.s3_bucket, recursive=True)}


def _multipart_uploads(s3: Minio, settings: Settings) -> set[str]:
    result = s3._list_multipart_uploads(settings.s3_bucket)  # noqa: SLF001 - no public listing
    return {str(upload.upload_id) for upload in result.uploads}


def test_stray_objects_that_no_row_owns_are_removed_once_old(
    client: TestClient,
    session: Session,
    settings: Settings,
    storage: BinaryStorage,
    s3: Minio,
) -> None:
    binary_id = _upload(client, samples.png(32, 32), "image/png")
    _with_derivatives(session, settings, storage, binary_id)
    # An upload in progress owns its assembling object and its staged tail.
    session.execute(
        text(
            "INSERT INTO tus_upload (id, owner_client_id, length, binary_id, expires_at)"
            " VALUES ('u-live', 'unit-01', 10, 'b-assembling', now() + interval '1 day')"
        )
    )
    owned = {
        f"binaries/{binary_id}",
        f"derivatives/{binary_id}/thumbnail.jpg",
        "binaries/b-assembling",
        "uploads/u-live/tail-1",
    }
    # What a crash between storing and recording leaves.
    strays = {
        "binaries/b-never-recorded",
        f"derivatives/{binary_id}/preview-unrecorded.jpg",
        "derivatives/b-gone/thumbnail.jpg",
        "uploads/u-gone/tail-1",
    }
    for key in {"binaries/b-assembling", "uploads/u-live/tail-1", *strays, "elsewhere/kept"}:
        storage.put_bytes(key, b"bytes")
    assert owned <= _all_keys(s3, settings)

    retention.sweep_stray_objects(
        session, storage=storage, now=datetime.now(UTC), min_age=timedelta(hours=72)
    )
    assert strays <= _all_keys(s3, settings)
    # Multipart uploads: one the upload in progress has recorded, one it is
    # starting (not recorded yet), one a crash left. Started after the first
    # sweep, as the local S3 server dates every one of them 2010.
    recorded = storage.start_multipart("binaries/b-assembling", content_type="image/png")
    starting = storage.start_multipart("binaries/b-assembling", content_type="image/png")
    crashed = storage.start_multipart("binaries/b-crashed", content_type="image/png")
    session.execute(
        text("UPDATE tus_upload SET multipart_upload_id = :id WHERE id = 'u-live'"),
        {"id": recorded},
    )

    removed = retention.sweep_stray_objects(
        session,
        storage=storage,
        now=datetime.now(UTC) + timedelta(hours=73),
        min_age=timedelta(hours=72),
    )

    left = _all_keys(s3, settings)
    # Earlier tests of this process (each test process has its own S3 server)
    # left objects whose rows rolled back: strays too.
    assert removed >= len(strays) + 1
    assert _multipart_uploads(s3, settings) >= {recorded, starting}
    assert crashed not in _multipart_uploads(s3, settings)
    assert not strays & left
    assert owned <= left
    assert "elsewhere/kept" in left
    assert client.get(f"/fhir/Binary/{binary_id}").status_code == 200


def test_a_stray_written_again_since_it_was_listed_is_kept(
    session: Session, storage: BinaryStorage, s3: Minio, settings: Settings
) -> None:
    # Listed as older than the cutoff, then written again by a retry whose
    # row is not committed yet: the object is newer than the cutoff now.
    storage.put_bytes("binaries/b-retried", b"bytes")
    listed_before = datetime.now(UTC) - timedelta(minutes=5)

    removed = retention._remove_strays(  # noqa: SLF001 - the window between listing and removal
        session, storage, ["binaries/b-retried"], cutoff=listed_before
    )

    assert removed == 0
    assert "binaries/b-retried" in _all_keys(s3, settings)


def test_store_down_during_the_stray_sweep_raises_for_retry(
    session: Session, down_storage: BinaryStorage
) -> None:
    with pytest.raises(StorageUnavailable):
        retention.sweep_stray_objects(
            session,
            storage=down_storage,
            now=datetime.now(UTC) + timedelta(days=30),
            min_age=timedelta(hours=72),
        )


def _media(patient_id: str, binary_id: str) -> dict[str, object]:
    return {
        "resourceType": "Media",
        "status": "completed",
        "subject": {"reference": f"Patient/{patient_id}"},
        "content": {"contentType": "image/png", "url": f"Binary/{binary_id}"},
    }


def _delete_media(client: TestClient, media_id: str) -> int:
    deleted = client.delete(f"/fhir/Media/{media_id}")
    assert deleted.status_code in (200, 204), deleted.text
    return int(deleted.headers["etag"].split('"')[1])


def test_deleting_a_media_deletes_its_binary_unless_another_resource_links_it(
    client: TestClient,
    session: Session,
    settings: Settings,
    link_table: Callable[[str, str, str], None],
) -> None:
    patient_id = client.post("/fhir/Patient", json=patient()).json()["id"]
    own_id = _upload(client, samples.png(), "image/png")
    shared_id = _upload(client, samples.png(), "image/png")
    media_ids = []
    for binary_id in (own_id, shared_id, shared_id):
        created = client.post("/fhir/Media", json=_media(patient_id, binary_id))
        assert created.status_code == 201, created.text
        media_ids.append(created.json()["id"])
        link_table(binary_id, "Media", media_ids[-1])

    # The deleted Media's own link row does not count (it may still be there).
    removed = retention.on_media_deleted(
        session,
        resource_type="Media",
        resource_id=media_ids[0],
        deleted_version=_delete_media(client, media_ids[0]),
        now=datetime.now(UTC),
        base_url=settings.fhir_base_url,
    )
    assert removed == [own_id]
    assert client.get(f"/fhir/Binary/{own_id}").status_code == 410
    assert _history_methods(client, own_id) == ["DELETE", "POST"]
    # Deleted, not purged: the object waits for the retention period.
    assert _row_count(session, "binary_object", own_id) == 1

    removed = retention.on_media_deleted(
        session,
        resource_type="Media",
        resource_id=media_ids[1],
        deleted_version=_delete_media(client, media_ids[1]),
        now=datetime.now(UTC),
        base_url=settings.fhir_base_url,
    )
    assert removed == []
    assert client.get(f"/fhir/Binary/{shared_id}").status_code == 200


def test_a_media_written_again_after_its_deletion_keeps_its_binary(
    client: TestClient,
    session: Session,
    settings: Settings,
    link_table: Callable[[str, str, str], None],
) -> None:
    patient_id = client.post("/fhir/Patient", json=patient()).json()["id"]
    binary_id = _upload(client, samples.png(), "image/png")
    media_id = client.post("/fhir/Media", json=_media(patient_id, binary_id)).json()["id"]
    deleted_version = _delete_media(client, media_id)
    # Restored before the deletion's event was handled.
    restored = client.put(
        f"/fhir/Media/{media_id}", json={**_media(patient_id, binary_id), "id": media_id}
    )
    assert restored.status_code in (200, 201), restored.text
    link_table(binary_id, "Media", media_id)

    removed = retention.on_media_deleted(
        session,
        resource_type="Media",
        resource_id=media_id,
        deleted_version=deleted_version,
        now=datetime.now(UTC),
        base_url=settings.fhir_base_url,
    )

    assert removed == []
    assert client.get(f"/fhir/Binary/{binary_id}").status_code == 200
    assert repository.count_binary_links(session, binary_id) == 1
    # A first version cannot be a deletion of anything that cited a Binary.
    first = retention.on_media_deleted(
        session,
        resource_type="Media",
        resource_id=media_id,
        deleted_version=1,
        now=datetime.now(UTC),
        base_url=settings.fhir_base_url,
    )
    assert first == []


def test_retention_settings_have_defaults_and_refuse_nonsense() -> None:
    defaults = Settings(env="test")
    assert defaults.binary_retention_days == 30
    assert defaults.orphan_binary_hours == 72
    assert defaults.stray_object_hours == 72
    with pytest.raises(ValueError, match="orphan_binary_hours"):
        Settings(env="test", orphan_binary_hours=0)
    with pytest.raises(ValueError, match="stray_object_hours"):
        Settings(env="test", stray_object_hours=0.5)


def test_the_stray_sweep_runs_daily() -> None:
    entry = celery_app.conf.beat_schedule["sweep-stray-objects"]
    assert entry["task"] == retention_tasks.STRAY_TASK
    assert retention_tasks.STRAY_TASK in celery_app.tasks
    assert entry["schedule"] == 86400
