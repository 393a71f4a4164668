"""Sources of the Parquet data for the queries: a local folder, or a bucket and prefix on MinIO.

Both contain the same layout, ``<kind>/date=<YYYY-MM-DD>/line=<line_id>/part-*.parquet``.
A local folder is read by DuckDB's own ``read_parquet``. A bucket is read through
pyarrow's built-in S3 file system and a :mod:`pyarrow.dataset`, which DuckDB scans
like a table. DuckDB's ``httpfs`` extension is not used, because DuckDB downloads it
on first use and that fails on a machine without internet access.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from qcstream.settings import Settings

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
#: S3 bucket names: 3 to 63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: ``date`` and ``line`` come from the folder names and stay text, as in the local reader.
HIVE_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string()), ("line", pa.string())]), flavor="hive")


@dataclasses.dataclass(frozen=True)
class S3Location:
    """A bucket and an optional key prefix (no leading or trailing ``/``) under which the kinds' folders lie."""

    bucket: str
    prefix: str = ""

    def key(self, relative: str) -> str:
        """Return the object key of ``relative`` (for example ``results/date=.../part-1.parquet``)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def path(self, relative: str = "") -> str:
        """Return ``bucket/prefix/relative`` as pyarrow's S3 file system names it."""
        parts = [self.bucket, self.prefix, relative]
        return "/".join(part for part in parts if part)

    def __str__(self) -> str:
        return S3_SCHEME + self.path()


Source = Union[Path, S3Location]


def parse_source(text: str | Path) -> Source:
    """Read a ``--source`` value: ``s3://BUCKET[/PREFIX]`` or a local folder.

    Raise :class:`ValueError` naming the value when it is neither.
    """
    if isinstance(text, Path):
        return text
    if not text.startswith(S3_SCHEME):
        if "://" in text:
            raise ValueError(
                f"invalid source {text!r}: only local folders and s3://BUCKET[/PREFIX] are supported"
            )
        return Path(text).expanduser()
    bucket, _, prefix = text[len(S3_SCHEME):].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"invalid source {text!r}: bucket name {bucket!r} is not a valid S3 bucket name "
            "(3 to 63 lower-case letters, digits, '.' and '-'); expected s3://BUCKET[/PREFIX]"
        )
    prefix = prefix.strip("/")
    if prefix and any(part in {"", ".", ".."} for part in prefix.split("/")):
        raise ValueError(f"invalid source {text!r}: the prefix {prefix!r} has an empty, '.' or '..' segment")
    return S3Location(bucket, prefix)


def s3_filesystem(settings: Settings) -> pafs.S3FileSystem:
    """Return a pyarrow S3 file system for the configured MinIO (the secret key goes to pyarrow only)."""
    return pafs.S3FileSystem(
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key,
        endpoint_override=settings.minio_endpoint,
        scheme="https" if settings.minio_secure else "http",
        region="us-east-1",
        allow_bucket_creation=False,
        allow_bucket_deletion=False,
        connect_timeout=10,
        request_timeout=60,
    )


def s3_dataset(
    filesystem: pafs.FileSystem, location: S3Location, kind: str, schema: pa.Schema, endpoint: str
) -> ds.Dataset | None:
    """Return a dataset over the ``kind`` Parquet files under ``location``, or None when there are none.

    Raise :class:`LookupError` when the bucket does not exist, and :class:`ConnectionError`
    when MinIO cannot be listed (unreachable, or the credentials are rejected).
    """
    base = location.path(kind)
    try:
        if filesystem.get_file_info(location.bucket).type == pafs.FileType.NotFound:
            raise LookupError(
                f"bucket {location.bucket!r} not found on MinIO at {endpoint}: check the --source URL, "
                f"or upload the data first with `qcstream parquet-upload s3://{location.bucket}`"
            )
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as error:
        raise ConnectionError(
            f"could not list {S3_SCHEME}{base} on MinIO at {endpoint}: {error}; check that MinIO runs "
            "(`qcstream services up`) and QCSTREAM_MINIO_ENDPOINT, QCSTREAM_MINIO_ACCESS_KEY and QCSTREAM_MINIO_SECRET_KEY"
        ) from error
    files = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet") and not info.base_name.startswith(".")
    )
    if not files:
        logger.debug("no %s Parquet files under %s%s", kind, S3_SCHEME, base)
        return None
    logger.debug("found %d %s Parquet files under %s%s", len(files), kind, S3_SCHEME, base)
    return ds.dataset(
        files, schema=schema, format="parquet", filesystem=filesystem,
        partitioning=HIVE_PARTITIONING, partition_base_dir=base,
    )
