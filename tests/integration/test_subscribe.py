"""``qcstream subscribe``: records read from real Kafka, printed as JSON lines, bad messages skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from qcstream.cli import main as cli_main
from qcstream.streams.records import InspectionResult
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration


def result(frame_id: str, score: float) -> InspectionResult:
    now = time.time()
    return InspectionResult(
        frame_id=frame_id, line_id="line-1", camera_id="cam-1", captured_at=now, inspected_at=now,
        image_score=score, threshold=20.0, is_defect=score >= 20.0, mode="rgb", model_version="test-model",
        maps_bucket="maps", anomaly_map_png_key=f"line-1/{frame_id}.png", anomaly_map_raw_key=f"line-1/{frame_id}.npy",
        detector_ms=50.0, latency_ms=80.0,
    )


def test_subscribe_prints_json_lines(pipeline_settings, monkeypatch, capsys, tmp_path: Path):
    settings = pipeline_settings(tmp_path)
    ensure_topics(settings)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    # One key, so one partition, so the subscriber reads them in this order.
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","))
    producer.send(settings.topic_defects, result("frame-1", 25.5).dumps(), key=b"line-1")
    producer.send(settings.topic_defects, b"{not json", key=b"line-1")
    producer.send(settings.topic_defects, json.dumps({**result("frame-2", 30.0).to_dict(), "schema_version": "2.0"}).encode(), key=b"line-1")
    producer.send(settings.topic_defects, result("frame-3", 41.0).dumps(), key=b"line-1")
    producer.flush()
    producer.close()

    code = cli_main(["subscribe", "defects", "--from-beginning", "--max-messages", "2", "--timeout", "30"])

    assert code == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["frame_id"] for line in lines] == ["frame-1", "frame-3"]
    assert lines[0]["schema_version"] == "1.0"
    assert lines[0]["kind"] == "result"
    assert lines[0]["image_score"] == 25.5
    assert lines[1]["is_defect"] is True
    assert "2 record(s), 2 skipped" in captured.err


def test_subscribe_quiet_timeout(pipeline_settings, monkeypatch, capsys, tmp_path: Path):
    settings = pipeline_settings(tmp_path)
    ensure_topics(settings)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    started = time.monotonic()
    code = cli_main(["subscribe", "results", "--timeout", "3"])

    assert code == 0
    assert time.monotonic() - started < 30
    assert capsys.readouterr().out == ""


def documented_consumer() -> str:
    """The Python code block of docs/consumers.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "consumers.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_documented_consumer_runs(pipeline_settings, tmp_path: Path):
    settings = pipeline_settings(tmp_path)
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","))
    producer.send(settings.topic_defects, result("frame-7", 33.25).dumps(), key=b"line-1")
    producer.send(settings.topic_defects, json.dumps({**result("frame-8", 30.0).to_dict(), "schema_version": "2.0"}).encode(), key=b"line-1")
    producer.flush()
    producer.close()
    script = tmp_path / "reject_gate.py"
    script.write_text(documented_consumer())
    env = {**os.environ, **settings.to_env(), "REJECT_GATE_GROUP": f"gate-{settings.app_id}"}

    gate = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60.0, gate.kill)  # a consumer that never prints must not hang the test run
    watchdog.start()
    try:
        lines = [gate.stdout.readline().strip() for _ in range(2)]
    finally:
        watchdog.cancel()
        gate.kill()
        gate.wait(timeout=30)

    assert lines[0] == "reject frame-7 on line-1: score 33.25 >= 20.00"
    assert lines[1] == "skipped a record with schema_version '2.0'; this gate reads 1.x"


def documented_label_sender() -> str:
    """The Python code block of docs/labels.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "labels.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_documented_label_sender_sends_a_valid_label(pipeline_settings, monkeypatch, capsys, tmp_path: Path):
    settings = pipeline_settings(tmp_path)
    ensure_topics(settings)
    script = tmp_path / "send_label.py"
    script.write_text(documented_label_sender())
    env = {**os.environ, **settings.to_env(), "FRAME_ID": "cam-9-0123456789ab"}

    sent = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)

    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "sent label of cam-9-0123456789ab"
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert cli_main(["subscribe", "labels", "--from-beginning", "--max-messages", "1", "--timeout", "30"]) == 0
    [label] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (label["frame_id"], label["line_id"], label["is_defect"], label["defect_type"]) == ("cam-9-0123456789ab", "line-1", True, "cut")
