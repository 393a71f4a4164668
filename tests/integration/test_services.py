"""Integration test: start the real local Kafka and MinIO, use them, stop them.

The jars and the MinIO binary come from the real cache (``QCSTREAM_HOME`` or
its default), so only the first run on a machine fetches and builds. Pid
files, logs and data go to a per-test run folder and the services use free
ports, so a developer's own ``services up`` on the default ports is left alone.
"""

from __future__ import annotations

import io
import socket
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from minio import Minio

from qcstream import services
from qcstream.services import process

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture()
def local_services_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    kafka_port, controller_port, minio_port, console_port = _free_ports(4)
    run_dir = tmp_path / "run"
    monkeypatch.setenv(services.RUN_DIR_ENV, str(run_dir))
    monkeypatch.setenv("QCSTREAM_KAFKA_PORT", str(kafka_port))
    monkeypatch.setenv("QCSTREAM_KAFKA_CONTROLLER_PORT", str(controller_port))
    monkeypatch.delenv("QCSTREAM_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("QCSTREAM_MINIO_ENDPOINT", f"127.0.0.1:{minio_port}")
    monkeypatch.setenv("QCSTREAM_MINIO_CONSOLE_PORT", str(console_port))
    return run_dir


def _kafka_round_trip(bootstrap: str) -> list[bytes]:
    topic = f"services-check-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        producer.send(topic, key=b"part-1", value=b'{"frame_id": "f-1"}').get(timeout=60)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=30_000,
    )
    try:
        for message in consumer:
            return [message.key, message.value]
    finally:
        consumer.close()
    return []


def _minio_round_trip(settings) -> bytes:
    client = Minio(
        settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key,
        secure=False,
    )
    bucket = f"services-check-{uuid.uuid4().hex[:8]}"
    payload = b"\x89PNG not really, 20 bytes"
    client.make_bucket(bucket)
    client.put_object(bucket, "line-1/frame.png", io.BytesIO(payload), len(payload))
    response = client.get_object(bucket, "line-1/frame.png")
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def test_up_use_status_down(local_services_env: Path) -> None:
    run_dir = local_services_env
    try:
        settings = services.up()
        assert settings.minio_secret_key

        report = services.status()
        assert report["kafka"].running
        assert report["minio"].running
        assert report["kafka"].address == settings.kafka_bootstrap
        assert report["minio"].address == settings.minio_endpoint
        pids = {name: entry.pid for name, entry in report.items()}
        assert all(pids.values())

        again = services.up()
        assert again.minio_secret_key == settings.minio_secret_key
        assert {name: entry.pid for name, entry in services.status().items()} == pids

        assert _kafka_round_trip(settings.kafka_bootstrap) == [b"part-1", b'{"frame_id": "f-1"}']
        assert _minio_round_trip(settings) == b"\x89PNG not really, 20 bytes"
    finally:
        services.down()

    report = services.status()
    assert not report["kafka"].running
    assert not report["minio"].running
    for pid in pids.values():
        assert process.process_cmdline(pid) is None
    assert not (run_dir / "kafka" / "kafka.pid").exists()
    assert not (run_dir / "minio" / "minio.pid").exists()
    assert (run_dir / "kafka" / "data" / "meta.properties").exists()



def test_up_port_taken_stops_started_kafka(local_services_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = local_services_env
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken_port = squatter.getsockname()[1]
        monkeypatch.setenv("QCSTREAM_MINIO_ENDPOINT", f"127.0.0.1:{taken_port}")

        try:
            with pytest.raises(services.PortInUseError) as caught:
                services.up()
            kafka_after_failure = services.status()["kafka"]
        finally:
            services.down()

    assert f"Port {taken_port}" in str(caught.value)
    assert "QCSTREAM_MINIO_ENDPOINT" in str(caught.value)
    assert (run_dir / "kafka" / "kafka.log").exists()  # Kafka was started before MinIO's port check
    assert kafka_after_failure.pid is None
    assert not (run_dir / "kafka" / "kafka.pid").exists()
