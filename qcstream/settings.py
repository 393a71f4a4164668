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


def _env_int(name: str, default: str) -> int:
    text = _env(name, default)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid {ENV_PREFIX}{name} {text!r}: expected a whole number such as {default}") from None


def _env_float(name: str, default: str) -> float:
    text = _env(name, default)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid {ENV_PREFIX}{name} {text!r}: expected a number such as {default or '0.1'}") from None


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
    topic_alerts: str = "alerts"
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
    #: Seconds between two FNR drift checks of the worker; 0 turns the check off.
    alert_check_seconds: float = 60.0
    #: The recent window of a line: its last this many labelled defects. The check
    #: waits until a line has that many, so one miss on a quiet line raises no alert.
    alert_recent_defects: int = 20
    #: The baseline: up to this many labelled defects before the recent window ...
    alert_baseline_defects: int = 200
    #: ... and at least this many; with fewer, ``alert_reference_fnr`` is the baseline.
    alert_min_baseline_defects: int = 20
    #: Expected FNR of a line without enough labelled history (for example the FNR
    #: that ``qcstream evaluate`` measured); None: no check until the history exists.
    alert_reference_fnr: float | None = None
    #: An alert fires when the one-sided p-value falls below this ...
    alert_p_value: float = 0.01
    #: ... and clears when it rises above this (hysteresis).
    alert_clear_p_value: float = 0.1
    #: Optional URL that gets each alert as a JSON POST. It may contain a token, so it is never logged.
    alert_webhook_url: str | None = dataclasses.field(default=None, repr=False)
    #: Bucket that receives a copy of every results, labels and alerts file the worker writes, under
    #: the same relative key (``results/date=.../line=.../part-....parquet``). Empty: no copy.
    parquet_bucket: str = ""

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("HOME", str(_default_home()))).expanduser()
        data_dir = Path(_env("DATA_DIR", "qcstream-data")).expanduser()
        kafka_port = _env_int("KAFKA_PORT", "9092")
        minio_endpoint = _env("MINIO_ENDPOINT", "127.0.0.1:9000")
        return cls(
            home=home,
            data_dir=data_dir,
            model_dir=Path(_env("MODEL_DIR", str(data_dir / "model"))).expanduser(),
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", f"127.0.0.1:{kafka_port}"),
            kafka_port=kafka_port,
            kafka_controller_port=_env_int("KAFKA_CONTROLLER_PORT", str(kafka_port + 1)),
            minio_endpoint=minio_endpoint,
            minio_access_key=_env("MINIO_ACCESS_KEY", "qcstream"),
            minio_secret_key=_read_secret(home),
            minio_secure=_env("MINIO_SECURE", "false").lower() in {"1", "true", "yes"},
            minio_console_port=_env_int("MINIO_CONSOLE_PORT", "9001"),
            topic_frames=_env("TOPIC_FRAMES", "frames"),
            topic_results=_env("TOPIC_RESULTS", "results"),
            topic_defects=_env("TOPIC_DEFECTS", "defects"),
            topic_labels=_env("TOPIC_LABELS", "labels"),
            topic_dead_letter=_env("TOPIC_DEAD_LETTER", "frames-dead-letter"),
            topic_alerts=_env("TOPIC_ALERTS", "alerts"),
            bucket_frames=_env("BUCKET_FRAMES", "frames"),
            bucket_maps=_env("BUCKET_MAPS", "anomaly-maps"),
            app_id=_env("APP_ID", "qcstream"),
            worker_web_port=_env_int("WORKER_WEB_PORT", "6066"),
            sink_batch_size=_env_int("SINK_BATCH_SIZE", "50"),
            sink_batch_seconds=_env_float("SINK_BATCH_SECONDS", "2.0"),
            alert_check_seconds=_env_float("ALERT_CHECK_SECONDS", "60"),
            alert_recent_defects=_env_int("ALERT_RECENT_DEFECTS", "20"),
            alert_baseline_defects=_env_int("ALERT_BASELINE_DEFECTS", "200"),
            alert_min_baseline_defects=_env_int("ALERT_MIN_BASELINE_DEFECTS", "20"),
            alert_reference_fnr=_env_float("ALERT_REFERENCE_FNR", "") if _env("ALERT_REFERENCE_FNR", "").strip() else None,
            alert_p_value=_env_float("ALERT_P_VALUE", "0.01"),
            alert_clear_p_value=_env_float("ALERT_CLEAR_P_VALUE", "0.1"),
            alert_webhook_url=_env("ALERT_WEBHOOK_URL", "") or None,
            parquet_bucket=_env("PARQUET_BUCKET", ""),
        )

    def to_env(self) -> dict[str, str]:
        """Return these settings as ``QCSTREAM_*`` variables, for a child process.

        The result contains the MinIO secret key and the webhook URL: pass it to a process, never log it.
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
            "TOPIC_ALERTS": self.topic_alerts,
            "BUCKET_FRAMES": self.bucket_frames,
            "BUCKET_MAPS": self.bucket_maps,
            "APP_ID": self.app_id,
            "WORKER_WEB_PORT": str(self.worker_web_port),
            "SINK_BATCH_SIZE": str(self.sink_batch_size),
            "SINK_BATCH_SECONDS": str(self.sink_batch_seconds),
            "ALERT_CHECK_SECONDS": str(self.alert_check_seconds),
            "ALERT_RECENT_DEFECTS": str(self.alert_recent_defects),
            "ALERT_BASELINE_DEFECTS": str(self.alert_baseline_defects),
            "ALERT_MIN_BASELINE_DEFECTS": str(self.alert_min_baseline_defects),
            "ALERT_REFERENCE_FNR": "" if self.alert_reference_fnr is None else str(self.alert_reference_fnr),
            "ALERT_P_VALUE": str(self.alert_p_value),
            "ALERT_CLEAR_P_VALUE": str(self.alert_clear_p_value),
            "ALERT_WEBHOOK_URL": self.alert_webhook_url or "",
            "PARQUET_BUCKET": self.parquet_bucket,
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
