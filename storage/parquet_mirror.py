"""Copies of the local Parquet files in a MinIO bucket, for queries with ``--source s3://...``.

Each file keeps its relative key: ``<root>/results/date=.../line=.../part-X.parquet``
becomes ``s3://<bucket>/[<prefix>/]results/date=.../line=.../part-X.parquet``.
The sink uploads each file right after it writes it when ``QCSTREAM_PARQUET_BUCKET``
is set, and ``qcstream parquet-upload`` copies the files that are still missing
(for example older data, or files whose upload failed while MinIO was down).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from qcstream.settings import Settings
from qcstream.storage.objects import ObjectStore
from qcstream.storage.parquet_source import S3Location, parse_source

logger = logging.getLogger(__name__)

PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"
#: The folders of the kinds the sink writes (see :mod:`qcstream.storage.parquet_sink`).
KINDS = ("results", "labels", "alerts")


class ParquetMirror:
    """Uploads Parquet files under a local root to the same relative keys under an S3 location."""

    def __init__(self, store: ObjectStore, location: S3Location) -> None:
        self.store = store
        self.location = location
        self._bucket_ready = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "ParquetMirror | None":
        """Return the mirror to ``settings.parquet_bucket``, or None when that setting is empty."""
        if not settings.parquet_bucket:
            return None
        location = parse_source(f"s3://{settings.parquet_bucket}")
        if not isinstance(location, S3Location) or location.prefix:
            raise ValueError(
                f"invalid QCSTREAM_PARQUET_BUCKET {settings.parquet_bucket!r}: expected a bucket name without '/'"
            )
        return cls(ObjectStore(settings), location)

    def key_of(self, root: Path, path: Path) -> str:
        """Return the object key of the file ``path``, which lies under ``root``."""
        return self.location.key(Path(path).relative_to(root).as_posix())

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist. Only the first call per mirror checks."""
        if not self._bucket_ready:
            self.store.ensure_buckets(self.location.bucket)
            self._bucket_ready = True

    def upload(self, root: Path, path: Path) -> str:
        """Upload one file (creating the bucket on first use) and return its key."""
        self.ensure_bucket()
        key = self.key_of(root, path)
        self.store.put_bytes(self.location.bucket, key, Path(path).read_bytes(), PARQUET_CONTENT_TYPE)
        logger.debug("copied %s to s3://%s/%s", path, self.location.bucket, key)
        return key


@dataclasses.dataclass(frozen=True)
class UploadSummary:
    uploaded: int
    already_there: int


def local_parquet_files(root: Path) -> list[Path]:
    """Return the finished Parquet files under ``root``'s kind folders, in name order (temporary files excluded)."""
    files: list[Path] = []
    for kind in KINDS:
        folder = Path(root) / kind
        if folder.is_dir():
            files.extend(path for path in folder.rglob("*.parquet") if not path.name.startswith("."))
    return sorted(files)


def upload_folder(mirror: ParquetMirror, root: Path) -> UploadSummary:
    """Upload every Parquet file under ``root`` whose key is not in the bucket yet.

    Files are never rewritten after the sink renames them into place, so a key that
    exists already contains the same content and is skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: set QCSTREAM_DATA_DIR or pass --source DIR")
    files = local_parquet_files(root)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {root}/{{{','.join(KINDS)}}}: nothing to upload")
    mirror.ensure_bucket()
    uploaded = already_there = 0
    for path in files:
        if mirror.store.exists(mirror.location.bucket, mirror.key_of(root, path)):
            already_there += 1
            continue
        mirror.upload(root, path)
        uploaded += 1
    logger.info("uploaded %d Parquet files from %s to %s (%d were there already)", uploaded, root, mirror.location, already_there)
    return UploadSummary(uploaded, already_there)
