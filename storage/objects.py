"""MinIO object store access and the object key layout.

Key layout (ids checked by :func:`qcstream.streams.records.validate_id`, dates in UTC):

- frame payloads: ``<line_id>/<camera_id>/<YYYY-MM-DD>/<frame_id>.<png|npy>``
- point clouds: ``<line_id>/<camera_id>/<YYYY-MM-DD>/<frame_id>.xyz.npz``
- anomaly maps: ``<line_id>/<YYYY-MM-DD>/<frame_id>.png`` and ``.npz``
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from datetime import datetime, timezone
from typing import Callable, TypeVar
from urllib.parse import quote

import certifi
import minio
import urllib3
from minio.error import S3Error, ServerError

from qcstream.settings import Settings
from qcstream.streams.records import validate_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Extensions allowed for frame payloads, matching ``FrameRef.payload_format``.
FRAME_EXTENSIONS = frozenset({"png", "npy"})
POINT_CLOUD_EXTENSION = "xyz.npz"
#: S3 limit on the length of an object key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024

#: S3 error codes that mean the credentials or the policy are wrong, not the request.
_ACCESS_ERROR_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket"})


class ObjectNotFoundError(LookupError):
    """The requested object or its bucket does not exist."""

    def __init__(self, bucket: str, key: str, reason: str = "object not found") -> None:
        self.bucket = bucket
        self.key = key
        super().__init__(
            f"{reason}: s3://{bucket}/{key}; check that the producer stored it "
            "and that the bucket name matches QCSTREAM_BUCKET_* settings"
        )


class ObjectStoreUnavailableError(ConnectionError):
    """MinIO could not be reached, or kept failing with server errors, after all retries."""


class ObjectStoreAccessError(PermissionError):
    """MinIO rejected the credentials or denied the operation."""


class ObjectStore:
    """Wrapper over :class:`minio.Minio` with retries and clear errors.

    Connection errors and HTTP 5xx responses are retried ``attempts`` times in
    total, waiting ``backoff_seconds`` doubled after each failure (up to 8 s).
    HTTP 4xx responses are never retried.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = 4,
        backoff_seconds: float = 0.5,
        client: minio.Minio | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"invalid attempts {attempts!r}: expected 1 or more")
        self.endpoint = settings.minio_endpoint
        self.access_key = settings.minio_access_key
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.client = client or minio.Minio(
            settings.minio_endpoint,
            access_key=settings.minio_access_key,
            secret_key=settings.minio_secret_key,
            secure=settings.minio_secure,
            http_client=_http_client(),
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> "ObjectStore":
        return cls(settings, **options)

    def ensure_buckets(self, *names: str) -> None:
        """Create each bucket in ``names`` that does not exist yet."""
        for name in names:
            if self._call("check bucket", name, "", lambda: self.client.bucket_exists(name)):
                continue
            try:
                self._call("create bucket", name, "", lambda: self.client.make_bucket(name))
            except S3Error as error:
                # Another process created it between the check and the creation.
                if error.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
            logger.info("bucket %s ready at %s", name, self.endpoint)

    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        validate_key(key)

        def put() -> None:
            # A fresh stream per attempt, because a failed attempt may have read part of it.
            self.client.put_object(bucket, key, io.BytesIO(data), length=len(data), content_type=content_type)

        self._call("put", bucket, key, put)
        logger.debug("stored %d bytes at s3://%s/%s", len(data), bucket, key)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        """Download the object's content. Raise :class:`ObjectNotFoundError` when the object or its bucket is missing."""
        validate_key(key)

        def get() -> bytes:
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return self._call("get", bucket, key, get)
        except S3Error as error:
            if error.code == "NoSuchBucket":
                raise ObjectNotFoundError(bucket, key, "bucket not found") from error
            if error.code == "NoSuchKey":
                raise ObjectNotFoundError(bucket, key) from error
            raise

    def exists(self, bucket: str, key: str) -> bool:
        validate_key(key)
        try:
            self._call("stat", bucket, key, lambda: self.client.stat_object(bucket, key))
        except S3Error as error:
            if error.code in _NOT_FOUND_CODES:
                return False
            raise
        return True

    def _call(self, operation: str, bucket: str, key: str, action: Callable[[], T]) -> T:
        """Run ``action`` and retry transient failures. Raise access errors as :class:`ObjectStoreAccessError`."""
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except S3Error as error:
                if error.code in _ACCESS_ERROR_CODES:
                    raise ObjectStoreAccessError(
                        f"MinIO at {self.endpoint} rejected {operation} s3://{bucket}/{key} "
                        f"for access key {self.access_key!r} ({error.code}); check "
                        "QCSTREAM_MINIO_ACCESS_KEY and QCSTREAM_MINIO_SECRET_KEY"
                    ) from error
                if not _is_server_error(error):
                    raise
                failure: Exception = error
            except ServerError as error:
                if error.status_code < 500:
                    raise
                failure = error
            except (urllib3.exceptions.HTTPError, ConnectionError) as error:
                failure = error

            if attempt == self.attempts:
                raise ObjectStoreUnavailableError(
                    f"{operation} s3://{bucket}/{key} failed after {self.attempts} attempts: "
                    f"MinIO at {self.endpoint} is unreachable or failing ({failure}); "
                    "start it with `qcstream services up` or check QCSTREAM_MINIO_ENDPOINT"
                ) from failure

            delay = min(self.backoff_seconds * 2 ** (attempt - 1), 8.0)
            logger.warning(
                "%s s3://%s/%s failed (attempt %d of %d): %s; retrying in %.1f s",
                operation, bucket, key, attempt, self.attempts, failure, delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _is_server_error(error: S3Error) -> bool:
    status = getattr(error.response, "status", None)
    return isinstance(status, int) and status >= 500


def _http_client() -> urllib3.PoolManager:
    """Build the HTTP pool that the MinIO client uses, with retries left to :class:`ObjectStore`.

    The certificate settings are the ones ``minio.Minio`` uses by default (minio 7.2).
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=60),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=False,
    )


def utc_date(timestamp: float) -> str:
    """Return the UTC day ``YYYY-MM-DD`` of a Unix time in seconds."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
        raise ValueError(f"invalid timestamp {timestamp!r}: expected seconds since the Unix epoch")
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe object key, else raise :class:`ValueError`.

    Keys built here always pass. The check guards keys that arrive in messages.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid object key {key!r}: expected a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"invalid object key {key[:64]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if any(ord(character) < 32 or ord(character) == 127 for character in key):
        raise ValueError(f"invalid object key {key!r}: contains control characters")
    if key.startswith("/") or any(part in {"", ".", ".."} for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    return key


def frame_payload_key(line_id: str, camera_id: str, captured_at: float, frame_id: str, ext: str) -> str:
    if ext not in FRAME_EXTENSIONS:
        raise ValueError(f"invalid frame payload extension {ext!r}: expected one of {sorted(FRAME_EXTENSIONS)}")
    return _camera_key(line_id, camera_id, captured_at, frame_id, ext)


def point_cloud_key(line_id: str, camera_id: str, captured_at: float, frame_id: str) -> str:
    return _camera_key(line_id, camera_id, captured_at, frame_id, POINT_CLOUD_EXTENSION)


def anomaly_map_keys(line_id: str, captured_at: float, frame_id: str) -> tuple[str, str]:
    """Return the (PNG heat map key, raw ``.npz`` score map key) of one frame."""
    validate_id("line_id", line_id)
    validate_id("frame_id", frame_id)
    prefix = f"{line_id}/{utc_date(captured_at)}/{frame_id}"
    return f"{prefix}.png", f"{prefix}.npz"


def anomaly_map_prefix(line_id: str) -> str:
    """Return the key prefix under which all anomaly maps of one line lie."""
    return f"{validate_id('line_id', line_id)}/"


def _camera_key(line_id: str, camera_id: str, captured_at: float, frame_id: str, ext: str) -> str:
    validate_id("line_id", line_id)
    validate_id("camera_id", camera_id)
    validate_id("frame_id", frame_id)
    return f"{line_id}/{camera_id}/{utc_date(captured_at)}/{frame_id}.{ext}"


def object_url(settings: Settings, bucket: str, key: str) -> str:
    """Return the HTTP address of an object (or of a key prefix) on the configured MinIO."""
    scheme = "https" if settings.minio_secure else "http"
    return f"{scheme}://{settings.minio_endpoint}/{bucket}/{quote(key, safe='/')}"


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"
