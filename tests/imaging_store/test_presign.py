"""Presigned download URLs, checked by their parameters and fetched from the local S3 server.

The local S3 server does not enforce signatures or expiry (DESIGN.md), so the
tests read the URL's signing parameters and fetch the bytes through it.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session

from fhir_api.context import UNRESTRICTED_ACCESS
from hub.errors import WahaError
from hub.settings import Settings
from imaging_store import presign
from imaging_store.service import Caller, binary_storage
from imaging_store.storage import BinaryStorage
from tests.imaging_store import samples


def _upload(client: TestClient, content: bytes, content_type: str) -> str:
    response = client.post("/fhir/Binary", content=content, headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


@pytest.fixture
def storage(settings: Settings) -> BinaryStorage:
    """The object store of the test app."""
    return binary_storage(settings)


def _caller(client_id: str = "admin") -> Caller:
    return Caller(client_id=client_id, author=client_id, request_id="-", access=UNRESTRICTED_ACCESS)


def test_url_is_signed_short_lived_and_fetches_the_bytes(
    client: TestClient, session: Session, settings: Settings, storage: BinaryStorage
) -> None:
    image = samples.png(16, 16)
    binary_id = _upload(client, image, "image/png")

    redirect = presign.redirect_binary(
        session,
        storage=storage,
        binary_id=binary_id,
        caller=_caller(),
        base_url=settings.fhir_base_url,
        expires_seconds=120,
    )

    query = _query(redirect.url)
    assert query["X-Amz-Expires"] == "120"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Signature"]
    assert query["X-Amz-Credential"].startswith(f"{settings.s3_access_key}/")
    assert query["X-Amz-SignedHeaders"] == "host"
    assert query["response-content-type"] == "image/png"
    assert "response-content-disposition" not in query
    assert urlsplit(redirect.url).path == f"/{settings.s3_bucket}/binaries/{binary_id}"
    assert redirect.version_id == 1
    fetched = httpx.get(redirect.url)
    assert fetched.status_code == 200
    assert fetched.content == image
    assert fetched.headers["content-type"] == "image/png"


def test_expiry_is_capped_at_300_seconds(storage: BinaryStorage) -> None:
    url = presign.presigned_download_url(
        storage, "binaries/x", expires_seconds=7 * 24 * 3600, content_type="image/jpeg"
    )
    assert _query(url)["X-Amz-Expires"] == "300"
    assert presign.redirect_seconds(0) == 1


def test_pdf_url_asks_for_an_attachment(
    client: TestClient, session: Session, settings: Settings, storage: BinaryStorage
) -> None:
    binary_id = _upload(client, samples.pdf(), "application/pdf")
    redirect = presign.redirect_binary(
        session,
        storage=storage,
        binary_id=binary_id,
        caller=_caller(),
        base_url=settings.fhir_base_url,
        expires_seconds=300,
    )
    query = _query(redirect.url)
    assert query["response-content-disposition"] == f'attachment; filename="{binary_id}.pdf"'
    fetched = httpx.get(redirect.url)
    assert fetched.status_code == 200
    assert fetched.content == samples.pdf()
    assert fetched.headers["content-disposition"] == f'attachment; filename="{binary_id}.pdf"'


def test_url_is_signed_for_the_public_endpoint_when_set(storage: BinaryStorage) -> None:
    url = presign.presigned_download_url(
        storage,
        "binaries/x",
        expires_seconds=60,
        content_type="image/png",
        public_endpoint="files.waha.example",
        public_secure=True,
    )
    assert url.startswith(f"https://files.waha.example/{storage.config.bucket}/binaries/x?")


def test_no_url_for_a_missing_or_deleted_binary(
    client: TestClient, session: Session, settings: Settings, storage: BinaryStorage
) -> None:
    def redirect(binary_id: str, caller: Caller) -> int:
        try:
            presign.redirect_binary(
                session,
                storage=storage,
                binary_id=binary_id,
                caller=caller,
                base_url=settings.fhir_base_url,
                expires_seconds=300,
            )
        except WahaError as error:
            return error.status
        return 200

    assert redirect("no-such-binary", _caller()) == 404
    deleted_id = _upload(client, samples.png(), "image/png")
    assert client.delete(f"/fhir/Binary/{deleted_id}").status_code == 204
    assert redirect(deleted_id, _caller()) == 410


def test_redirect_settings_default_off_and_refuse_over_300_seconds() -> None:
    defaults = Settings(env="test")
    assert defaults.binary_download_redirect is False
    assert defaults.binary_redirect_seconds == 300
    with pytest.raises(ValidationError, match="binary_redirect_seconds"):
        Settings(env="test", binary_redirect_seconds=301)
    with pytest.raises(ValidationError, match="binary_redirect_seconds"):
        Settings(env="test", binary_redirect_seconds=0)
