"""Object store access (MinIO), the Parquet sink and DuckDB quality queries.

This package imports only :mod:`qcstream.storage.objects`, which needs the base
dependencies, so a camera station can store frames. Import
:mod:`~qcstream.storage.parquet_sink`, :mod:`~qcstream.storage.queries` and
:mod:`~qcstream.storage.report` directly: they need pyarrow and DuckDB from the
``worker`` extra. Nothing here imports torch.
"""

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

__all__ = [
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreAccessError",
    "ObjectStoreUnavailableError",
    "anomaly_map_keys",
    "frame_payload_key",
    "object_url",
    "point_cloud_key",
    "s3_uri",
    "utc_date",
    "validate_key",
]
