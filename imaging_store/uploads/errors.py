"""Errors of resumable uploads, with the status codes tus 1.0.0 gives them."""

from __future__ import annotations

from hub.errors import WahaError

TUS_VERSION = "1.0.0"


class TusVersionUnsupported(WahaError):
    """The client speaks a tus version Waha does not."""

    status = 412
    issue_code = "not-supported"
    slug = "tus-version-unsupported"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        # tus 1.0.0: a 412 names the versions the server supports.
        self.headers["Tus-Version"] = TUS_VERSION


class InvalidUploadRequest(WahaError):
    """A tus header is missing or malformed (Upload-Length, Upload-Offset, metadata)."""

    status = 400
    issue_code = "invalid"
    slug = "invalid-upload-request"


class UploadTooLarge(WahaError):
    """Upload-Length is over the limit, or a PATCH would go past Upload-Length."""

    status = 413
    issue_code = "too-costly"
    slug = "upload-too-large"


class NotOffsetOctetStream(WahaError):
    """A PATCH body must be `application/offset+octet-stream`."""

    status = 415
    issue_code = "not-supported"
    slug = "not-offset-octet-stream"


class UploadNotFound(WahaError):
    """No such upload, or not one the caller made."""

    status = 404
    issue_code = "not-found"
    slug = "upload-not-found"


class UploadExpired(WahaError):
    """The upload waited too long for its next PATCH and will be removed."""

    status = 410
    issue_code = "expired"
    slug = "upload-expired"


class UploadOffsetMismatch(WahaError):
    """Upload-Offset is not the offset the server holds; HEAD tells the right one."""

    status = 409
    issue_code = "conflict"
    slug = "upload-offset-mismatch"


class UploadBusy(WahaError):
    """Another request is writing this upload right now."""

    status = 423
    issue_code = "lock-error"
    slug = "upload-busy"


class ChecksumAlgorithmUnsupported(WahaError):
    """Upload-Checksum names an algorithm Waha does not verify."""

    status = 400
    issue_code = "not-supported"
    slug = "checksum-algorithm-unsupported"


class ChecksumMismatch(WahaError):
    """The PATCH body does not hash to its Upload-Checksum; the chunk was discarded."""

    status = 460
    issue_code = "invalid"
    slug = "checksum-mismatch"


class UploadInterrupted(WahaError):
    """The client went away before the PATCH body ended."""

    status = 400
    issue_code = "incomplete"
    slug = "upload-interrupted"
