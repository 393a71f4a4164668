"""ObjectStore against a real MinIO server (the ``minio_settings`` fixture)."""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest

from qcstream.storage.objects import (
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreAccessError,
    anomaly_map_keys,
    frame_payload_key,
    point_cloud_key,
)

pytestmark = pytest.mark.integration

CAPTURED_AT = 1700006400.0  # 2023-11-15 00:00:00 UTC


def unique_bucket(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def store(minio_settings) -> ObjectStore:
    return ObjectStore(minio_settings, attempts=2, backoff_seconds=0.1)


@pytest.fixture()
def bucket(store) -> str:
    name = unique_bucket("frames")
    store.ensure_buckets(name)
    return name


def test_ensure_buckets_creates_missing(store):
    first, second = unique_bucket("frames"), unique_bucket("maps")
    assert not store.client.bucket_exists(first)

    store.ensure_buckets(first, second)
    store.ensure_buckets(first, second)

    assert store.client.bucket_exists(first)
    assert store.client.bucket_exists(second)


def test_put_get_round_trip(store, bucket):
    key = frame_payload_key("line-1", "cam-1", CAPTURED_AT, "frame-0001", "png")
    payload = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40

    store.put_bytes(bucket, key, payload, "image/png")

    assert store.get_bytes(bucket, key) == payload
    assert store.client.stat_object(bucket, key).content_type == "image/png"
    listed = [item.object_name for item in store.client.list_objects(bucket, prefix="line-1/", recursive=True)]
    assert listed == ["line-1/cam-1/2023-11-15/frame-0001.png"]


def test_overwrite_returns_latest(store, bucket):
    key = point_cloud_key("line-1", "cam-1", CAPTURED_AT, "frame-0002")

    store.put_bytes(bucket, key, b"first")
    store.put_bytes(bucket, key, b"second")

    assert store.get_bytes(bucket, key) == b"second"


def test_exists(store, bucket):
    png_key, raw_key = anomaly_map_keys("line-1", CAPTURED_AT, "frame-0003")
    store.put_bytes(bucket, png_key, b"png", "image/png")

    assert store.exists(bucket, png_key) is True
    assert store.exists(bucket, raw_key) is False
    assert store.exists(unique_bucket("absent"), png_key) is False


def test_get_missing_object(store, bucket):
    with pytest.raises(ObjectNotFoundError) as caught:
        store.get_bytes(bucket, "line-1/2023-11-15/nothing.png")

    assert caught.value.bucket == bucket
    assert caught.value.key == "line-1/2023-11-15/nothing.png"


def test_get_from_missing_bucket(store):
    with pytest.raises(ObjectNotFoundError, match="bucket not found"):
        store.get_bytes(unique_bucket("absent"), "line-1/x.png")


def test_wrong_secret_rejected_without_retry(minio_settings, bucket, caplog):
    wrong = dataclasses.replace(minio_settings, minio_secret_key="wrong-" + minio_settings.minio_secret_key)
    store = ObjectStore(wrong, attempts=3, backoff_seconds=0.1)

    with caplog.at_level(logging.WARNING, logger="qcstream.storage.objects"):
        with pytest.raises(ObjectStoreAccessError) as caught:
            store.put_bytes(bucket, "line-1/x.png", b"data")

    assert [record for record in caplog.records if "retrying" in record.getMessage()] == []
    assert minio_settings.minio_secret_key not in str(caught.value)
