"""Object key layout, key validation and the retry policy of ObjectStore."""

from __future__ import annotations

import logging
import socket
import types
from pathlib import Path

import pytest
import urllib3
from minio.error import S3Error

from qcstream.settings import Settings
from qcstream.storage.objects import (
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreAccessError,
    ObjectStoreUnavailableError,
    anomaly_map_keys,
    frame_payload_key,
    object_url,
    point_cloud_key,
    s3_uri,
    utc_date,
    validate_key,
)
from qcstream.streams.records import RecordError

# 1700000000 is 2023-11-14 22:13:20 UTC, so 1700006400 is the next midnight.
LAST_SECOND_OF_DAY = 1700006399.5
MIDNIGHT = 1700006400.0

BAD_IDS = ["../x", "a/b", "", "..", ".hidden", "a\x00b", "a\nb", "tab\there", "a b", "x" * 129, None, 7]


def make_settings(endpoint: str = "127.0.0.1:9000", secure: bool = False) -> Settings:
    return Settings(
        home=Path("/nonexistent/home"),
        data_dir=Path("/nonexistent/data"),
        model_dir=Path("/nonexistent/model"),
        kafka_bootstrap="127.0.0.1:9092",
        kafka_port=9092,
        kafka_controller_port=9093,
        minio_endpoint=endpoint,
        minio_access_key="qcstream",
        minio_secret_key="not-a-real-secret",
        minio_secure=secure,
    )


def s3_error(code: str, status: int, key: str = "k") -> S3Error:
    return S3Error(
        response=types.SimpleNamespace(status=status),
        code=code,
        message="test",
        resource=f"/bucket/{key}",
        request_id="request",
        host_id="host",
        bucket_name="bucket",
        object_name=key,
    )


def connection_error() -> urllib3.exceptions.HTTPError:
    return urllib3.exceptions.NewConnectionError(None, "connection refused")


class ScriptedClient:
    """Stand-in for minio.Minio whose methods raise the scripted errors in turn, then succeed."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def _next(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)

    def put_object(self, bucket, key, data, length, content_type):
        self._next()
        assert data.read() == b"payload"

    def stat_object(self, bucket, key):
        self._next()

    def get_object(self, bucket, key):
        self._next()
        raise AssertionError("get_object succeeded in a test that expected an error")


def test_frame_payload_key_layout():
    key = frame_payload_key("line-1", "cam_2", 1700000000.0, "f.0001", "png")

    assert key == "line-1/cam_2/2023-11-14/f.0001.png"


def test_keys_use_utc_day_of_capture():
    assert frame_payload_key("L", "C", LAST_SECOND_OF_DAY, "f", "npy") == "L/C/2023-11-14/f.npy"
    assert frame_payload_key("L", "C", MIDNIGHT, "f", "npy") == "L/C/2023-11-15/f.npy"


def test_point_cloud_key_layout():
    assert point_cloud_key("L", "C", MIDNIGHT, "f7") == "L/C/2023-11-15/f7.xyz.npz"


def test_anomaly_map_keys_layout():
    png_key, raw_key = anomaly_map_keys("L", LAST_SECOND_OF_DAY, "f7")

    assert png_key == "L/2023-11-14/f7.png"
    assert raw_key == "L/2023-11-14/f7.npz"


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_key_builders_reject_bad_ids(bad_id):
    with pytest.raises(RecordError):
        frame_payload_key(bad_id, "C", MIDNIGHT, "f", "png")
    with pytest.raises(RecordError):
        frame_payload_key("L", bad_id, MIDNIGHT, "f", "png")
    with pytest.raises(RecordError):
        frame_payload_key("L", "C", MIDNIGHT, bad_id, "png")
    with pytest.raises(RecordError):
        point_cloud_key("L", "C", MIDNIGHT, bad_id)
    with pytest.raises(RecordError):
        anomaly_map_keys(bad_id, MIDNIGHT, "f")
    with pytest.raises(RecordError):
        anomaly_map_keys("L", MIDNIGHT, bad_id)


def test_bad_id_error_names_value():
    with pytest.raises(RecordError, match=r"'\.\./x'"):
        frame_payload_key("../x", "C", MIDNIGHT, "f", "png")


@pytest.mark.parametrize("ext", ["exe", "", "PNG", "png/../x", "xyz.npz", ".png"])
def test_frame_payload_key_rejects_extension(ext):
    with pytest.raises(ValueError, match="extension"):
        frame_payload_key("L", "C", MIDNIGHT, "f", ext)


@pytest.mark.parametrize("captured_at", [float("nan"), float("inf"), "2023-11-14", None, True])
def test_keys_reject_bad_capture_time(captured_at):
    with pytest.raises(ValueError, match="timestamp"):
        frame_payload_key("L", "C", captured_at, "f", "png")


def test_utc_date_of_epoch():
    assert utc_date(0) == "1970-01-01"


@pytest.mark.parametrize(
    "key", ["../x", "a/../b", "a//b", "/a", "a/./b", "a/", "", "a\x00b", "a\x7fb", "x" * 1025, None]
)
def test_validate_key_rejects(key):
    with pytest.raises(ValueError, match="invalid object key"):
        validate_key(key)


def test_validate_key_accepts_built_keys():
    key = frame_payload_key("L", "C", MIDNIGHT, "f.1", "png")

    assert validate_key(key) == key


def test_object_url_plain_and_secure():
    key = "L/2023-11-15/f7.png"

    assert object_url(make_settings(), "anomaly-maps", key) == "http://127.0.0.1:9000/anomaly-maps/L/2023-11-15/f7.png"
    assert object_url(make_settings("minio.local:443", secure=True), "b", "L/") == "https://minio.local:443/b/L/"
    assert s3_uri("anomaly-maps", "L/") == "s3://anomaly-maps/L/"


def test_retries_connection_errors_then_succeeds(caplog):
    client = ScriptedClient(connection_error(), connection_error())
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    with caplog.at_level(logging.WARNING, logger="qcstream.storage.objects"):
        store.put_bytes("frames", "L/C/2023-11-15/f.png", b"payload", "image/png")

    assert client.calls == 3
    retry_messages = [record.getMessage() for record in caplog.records]
    assert len(retry_messages) == 2
    assert all("s3://frames/L/C/2023-11-15/f.png" in message for message in retry_messages)


def test_retries_server_errors():
    client = ScriptedClient(s3_error("InternalError", 500), s3_error("SlowDown", 503))
    store = ObjectStore(make_settings(), attempts=3, backoff_seconds=0, client=client)

    assert store.exists("frames", "k") is True
    assert client.calls == 3


def test_gives_up_after_all_attempts():
    client = ScriptedClient(*[connection_error() for _ in range(5)])
    store = ObjectStore(make_settings(), attempts=3, backoff_seconds=0, client=client)

    with pytest.raises(ObjectStoreUnavailableError, match="after 3 attempts"):
        store.put_bytes("frames", "k", b"payload")
    assert client.calls == 3


def test_missing_object_not_retried():
    client = ScriptedClient(s3_error("NoSuchKey", 404, key="L/f.png"))
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    with pytest.raises(ObjectNotFoundError) as caught:
        store.get_bytes("frames", "L/f.png")

    assert client.calls == 1
    assert caught.value.bucket == "frames"
    assert caught.value.key == "L/f.png"
    assert "s3://frames/L/f.png" in str(caught.value)


def test_missing_bucket_raises_not_found():
    client = ScriptedClient(s3_error("NoSuchBucket", 404))
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    with pytest.raises(ObjectNotFoundError, match="bucket not found"):
        store.get_bytes("nobucket", "k")
    assert client.calls == 1


def test_access_denied_not_retried_and_secret_not_shown():
    client = ScriptedClient(s3_error("SignatureDoesNotMatch", 403))
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    with pytest.raises(ObjectStoreAccessError) as caught:
        store.put_bytes("frames", "k", b"payload")

    assert client.calls == 1
    assert "qcstream" in str(caught.value)
    assert "not-a-real-secret" not in str(caught.value)


def test_other_client_errors_not_retried():
    client = ScriptedClient(s3_error("InvalidRequest", 400))
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    with pytest.raises(S3Error):
        store.exists("frames", "k")
    assert client.calls == 1


def test_exists_false_for_missing_object():
    client = ScriptedClient(s3_error("NoSuchKey", 404))
    store = ObjectStore(make_settings(), attempts=4, backoff_seconds=0, client=client)

    assert store.exists("frames", "k") is False


def test_store_rejects_unsafe_key_before_request():
    client = ScriptedClient()
    store = ObjectStore(make_settings(), backoff_seconds=0, client=client)

    with pytest.raises(ValueError, match="invalid object key"):
        store.get_bytes("frames", "../other/secret")
    assert client.calls == 0


def test_real_client_unreachable_endpoint(caplog):
    # A port that was free a moment ago: nothing listens there, so connecting fails.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = ObjectStore(make_settings(f"127.0.0.1:{port}"), attempts=2, backoff_seconds=0)

    with caplog.at_level(logging.WARNING, logger="qcstream.storage.objects"):
        with pytest.raises(ObjectStoreUnavailableError, match=f"127.0.0.1:{port}"):
            store.put_bytes("frames", "L/f.png", b"payload")

    assert len(caplog.records) == 1
    assert "s3://frames/L/f.png" in caplog.records[0].getMessage()
