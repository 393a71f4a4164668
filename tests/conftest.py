"""Shared fixtures: the real local Kafka and MinIO, and a small fitted model.

Integration tests run against the services of ``qcstream services up``. When they
are not running, the session starts them and stops them at the end. Each test
session uses its own topics, buckets and data folder, so runs never mix.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qcstream.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
TIRE_ROOT = DATA_ROOT / "mvtec3d_tire"
TILE_ROOT = DATA_ROOT / "magnetic_tile"


def require_data(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: place the shared data folder beside the checkout")
    return path


@pytest.fixture(scope="session")
def tire_root() -> Path:
    return require_data(TIRE_ROOT)


@pytest.fixture(scope="session")
def live_services() -> Settings:
    """Make sure the local Kafka and MinIO run; stop them afterwards if this session started them."""
    from qcstream import services

    settings = Settings.from_env()
    was_running = all(item.running for item in services.status(settings).values())
    settings = services.up(settings)
    yield settings
    if not was_running:
        services.down(settings)


@pytest.fixture(scope="session")
def cleanup_streams(live_services: Settings):
    """Return a function that registers test settings whose topics and buckets are deleted at the end.

    Tests use the user's local services, so they remove what they created.
    """
    registered: list[Settings] = []
    yield registered.append
    for settings in registered:
        _delete_topics_and_buckets(settings)


def _delete_topics_and_buckets(settings: Settings) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError
    from minio.deleteobjects import DeleteObject
    from minio.error import S3Error

    from qcstream.storage.objects import ObjectStore
    from qcstream.streams.topics import topic_names

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","))
    try:
        existing = set(admin.list_topics())
        doomed = [name for name in topic_names(settings) if name in existing]
        if doomed:
            admin.delete_topics(doomed)
    except KafkaError as error:
        print(f"could not delete test topics: {error}")
    finally:
        admin.close()

    client = ObjectStore(settings).client
    for bucket in (settings.bucket_frames, settings.bucket_maps):
        try:
            if not client.bucket_exists(bucket):
                continue
            objects = [DeleteObject(item.object_name) for item in client.list_objects(bucket, recursive=True)]
            for error in client.remove_objects(bucket, objects):
                print(f"could not delete {bucket}/{error.name}: {error}")
            client.remove_bucket(bucket)
        except S3Error as error:
            print(f"could not delete test bucket {bucket}: {error}")


@pytest.fixture(scope="session")
def kafka_settings(live_services: Settings, cleanup_streams, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the running services with topics, buckets and data folder unique to this session."""
    settings = with_own_streams(live_services, tmp_path_factory.mktemp("qcstream-data"))
    cleanup_streams(settings)
    return settings


@pytest.fixture
def pipeline_settings(kafka_settings: Settings, tmp_path: Path, cleanup_streams):
    """Return a function that makes settings with this test's own group, topics, buckets, data folder and port."""

    def make(model_dir: Path) -> Settings:
        settings = with_own_streams(
            kafka_settings, tmp_path / "data", model_dir=Path(model_dir), sink_batch_size=50, sink_batch_seconds=1.0
        )
        cleanup_streams(settings)
        return settings

    return make


def with_own_streams(base: Settings, data_dir: Path, **changes) -> Settings:
    """Return ``base`` with new topics, buckets, consumer group, web port and ``data_dir``, plus ``changes``."""
    suffix = uuid.uuid4().hex[:8]
    return dataclasses.replace(
        base,
        data_dir=data_dir,
        topic_frames=f"frames-{suffix}",
        topic_results=f"results-{suffix}",
        topic_defects=f"defects-{suffix}",
        topic_labels=f"labels-{suffix}",
        topic_dead_letter=f"frames-dead-letter-{suffix}",
        topic_alerts=f"alerts-{suffix}",
        bucket_frames=f"frames-{suffix}",
        bucket_maps=f"anomaly-maps-{suffix}",
        app_id=f"qcstream-test-{suffix}",
        worker_web_port=_free_port(),
        **changes,
    )


@pytest.fixture(scope="session")
def minio_settings(kafka_settings: Settings) -> Settings:
    return kafka_settings


@pytest.fixture(scope="session")
def fitted_model_dir(tire_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A detector fitted on 24 tire training images and calibrated on 8 validation images."""
    from qcstream.models import data as data_io
    from qcstream.models.detector import DetectorConfig, PatchCoreDetector

    train = [s.image_path for s in data_io.discover(tire_root, "train")][:24]
    validation = [s.image_path for s in data_io.discover(tire_root, "validation")][:8]
    model_dir = tmp_path_factory.mktemp("model")
    PatchCoreDetector(DetectorConfig(coreset_ratio=0.1)).fit(train, validation, progress=False).save(model_dir)
    return model_dir


#: Generated scans for the multimodal tests: small, so a fit takes seconds.
SCAN_SIZE = 112
SCAN_GRID = 14


@pytest.fixture(scope="session")
def scan_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated "ring" category: 8 train, 10 validation, 4 good and 3 each of dent, stain, hole for test."""
    from qcstream.models.scan_generator import write_dataset

    return write_dataset(
        tmp_path_factory.mktemp("scans"), "ring", seed=5, size=(SCAN_SIZE, SCAN_SIZE), n_train=8, n_validation=10,
        n_test_good=4, n_test_per_defect=3, defects=["dent", "stain", "hole"], progress=False,
    )


@pytest.fixture(scope="session")
def multimodal_model_dir(scan_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fused RGB + FPFH detector fitted on the generated scans."""
    from qcstream.models import data as data_io
    from qcstream.models.multimodal import MultimodalDetector
    from qcstream.models.multimodal_config import MultimodalConfig

    config = MultimodalConfig(
        image_size=(SCAN_SIZE, SCAN_SIZE), cloud_size=(SCAN_SIZE, SCAN_SIZE), feature_grid=(SCAN_GRID, SCAN_GRID),
        coreset_ratio=0.25, fusion_epochs=3,
    )
    detector = MultimodalDetector(config).fit(
        data_io.discover(scan_root, "train"), data_io.discover(scan_root, "validation"), progress=False
    )
    return detector.save(tmp_path_factory.mktemp("multimodal-model"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebhookReceiver:
    """An HTTP server on a free 127.0.0.1 port that responds to each POST with the next status in ``statuses``."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.paths.append(self.path)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token?key=hunter2"

    def start(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver():
    """Return a function that starts a :class:`WebhookReceiver` with some statuses; all are stopped after the test."""
    started: list[WebhookReceiver] = []

    def start(statuses: list[int] | None = None) -> WebhookReceiver:
        receiver = WebhookReceiver(statuses or []).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()
