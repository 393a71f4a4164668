"""Settings read from environment variables.

Every setting has a default that works with the local services started by
``qcstream services up``. Secrets (the MinIO secret key) are read from the
environment or from the file that ``services up`` writes, and are never logged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

ENV_PREFIX = "QCSTREAM_"


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _default_home() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "qcstream"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Runtime settings; build one with :meth:`from_env`.

    Each field is read from ``QCSTREAM_<FIELD NAME IN UPPER CASE>``.
    """

    #: Cache for downloaded Kafka jars, the MinIO binary and local service data.
    home: Path
    #: Folder for the Parquet results and labels.
    data_dir: Path
    #: Model directory written by ``qcstream fit`` and read by the worker.
    model_dir: Path
    kafka_bootstrap: str
    #: Port of the local Kafka broker's listener and of its KRaft controller.
    kafka_port: int
    kafka_controller_port: int
    minio_endpoint: str
    minio_access_key: str
    minio_secret_key: str = dataclasses.field(repr=False)
    minio_secure: bool = False
    minio_console_port: int = 9001
    topic_frames: str = "frames"
    topic_results: str = "results"
    topic_defects: str = "defects"
    topic_labels: str = "labels"
    topic_dead_letter: str = "frames-dead-letter"
    bucket_frames: str = "frames"
    bucket_maps: str = "anomaly-maps"
    #: Faust application id, which is also the Kafka consumer group of the workers.
    app_id: str = "qcstream"
    #: Port of the Faust worker's web server (statistics), bound to 127.0.0.1.
    worker_web_port: int = 6066
    #: Results and labels are written to Parquet in batches of this many records ...
    sink_batch_size: int = 50
    #: ... or after this many seconds, whichever comes first.
    sink_batch_seconds: float = 2.0

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("HOME", str(_default_home()))).expanduser()
        data_dir = Path(_env("DATA_DIR", "qcstream-data")).expanduser()
        kafka_port = int(_env("KAFKA_PORT", "9092"))
        minio_endpoint = _env("MINIO_ENDPOINT", "127.0.0.1:9000")
        return cls(
            home=home,
            data_dir=data_dir,
            model_dir=Path(_env("MODEL_DIR", str(data_dir / "model"))).expanduser(),
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", f"127.0.0.1:{kafka_port}"),
            kafka_port=kafka_port,
            kafka_controller_port=int(_env("KAFKA_CONTROLLER_PORT", str(kafka_port + 1))),
            minio_endpoint=minio_endpoint,
            minio_access_key=_env("MINIO_ACCESS_KEY", "qcstream"),
            minio_secret_key=_read_secret(home),
            minio_secure=_env("MINIO_SECURE", "false").lower() in {"1", "true", "yes"},
            minio_console_port=int(_env("MINIO_CONSOLE_PORT", "9001")),
            topic_frames=_env("TOPIC_FRAMES", "frames"),
            topic_results=_env("TOPIC_RESULTS", "results"),
            topic_defects=_env("TOPIC_DEFECTS", "defects"),
            topic_labels=_env("TOPIC_LABELS", "labels"),
            topic_dead_letter=_env("TOPIC_DEAD_LETTER", "frames-dead-letter"),
            bucket_frames=_env("BUCKET_FRAMES", "frames"),
            bucket_maps=_env("BUCKET_MAPS", "anomaly-maps"),
            app_id=_env("APP_ID", "qcstream"),
            worker_web_port=int(_env("WORKER_WEB_PORT", "6066")),
            sink_batch_size=int(_env("SINK_BATCH_SIZE", "50")),
            sink_batch_seconds=float(_env("SINK_BATCH_SECONDS", "2.0")),
        )

    def to_env(self) -> dict[str, str]:
        """Return these settings as ``QCSTREAM_*`` variables, for a child process.

        The result contains the MinIO secret key: pass it to a process, never log it.
        """
        env = {
            "HOME": str(self.home),
            "DATA_DIR": str(self.data_dir),
            "MODEL_DIR": str(self.model_dir),
            "KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "KAFKA_PORT": str(self.kafka_port),
            "KAFKA_CONTROLLER_PORT": str(self.kafka_controller_port),
            "MINIO_ENDPOINT": self.minio_endpoint,
            "MINIO_ACCESS_KEY": self.minio_access_key,
            "MINIO_SECRET_KEY": self.minio_secret_key,
            "MINIO_SECURE": "true" if self.minio_secure else "false",
            "MINIO_CONSOLE_PORT": str(self.minio_console_port),
            "TOPIC_FRAMES": self.topic_frames,
            "TOPIC_RESULTS": self.topic_results,
            "TOPIC_DEFECTS": self.topic_defects,
            "TOPIC_LABELS": self.topic_labels,
            "TOPIC_DEAD_LETTER": self.topic_dead_letter,
            "BUCKET_FRAMES": self.bucket_frames,
            "BUCKET_MAPS": self.bucket_maps,
            "APP_ID": self.app_id,
            "WORKER_WEB_PORT": str(self.worker_web_port),
            "SINK_BATCH_SIZE": str(self.sink_batch_size),
            "SINK_BATCH_SECONDS": str(self.sink_batch_seconds),
        }
        return {ENV_PREFIX + name: value for name, value in env.items()}

    @property
    def minio_secret_file(self) -> Path:
        return local_secret_file(self.home)

    @property
    def minio_port(self) -> int:
        return int(self.minio_endpoint.rsplit(":", 1)[1])


def local_secret_file(home: Path) -> Path:
    """Return the file where ``services up`` keeps the local MinIO secret key."""
    return home / "minio" / "secret-key"


def _read_secret(home: Path) -> str:
    value = os.environ.get(ENV_PREFIX + "MINIO_SECRET_KEY")
    if value:
        return value
    secret_file = local_secret_file(home)
    if secret_file.exists():
        return secret_file.read_text().strip()
    return ""
