"""FNR drift alerting end to end: results and labels through Kafka, the worker's timer, alerts out.

The test plays the inspection results and the audit station's labels of two
lines into Kafka, in three phases: a calm history, a drift in which line L1's
detector misses most defects, and a recovery. The real worker (sink agent and
drift timer) must stay quiet in the first phase. In the second it must raise one
alert on the ``alerts`` topic, the log and a webhook on 127.0.0.1, and suppress
repeats. In the third it must clear the same alert.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer
from scipy import stats

from qcstream.cli import main as cli_main
from qcstream.settings import Settings
from qcstream.storage.drift import line_defect_counts
from qcstream.storage.queries import connect
from qcstream.streams.labels import LabelPublisher
from qcstream.streams.producer import new_kafka_producer
from qcstream.streams.records import Alert, InspectionResult, Label
from qcstream.streams.topics import ensure_topics

pytestmark = pytest.mark.integration

RECENT = 10
DEADLINE_S = 120.0
#: Checks run every second; this many seconds of silence means no alert is coming.
QUIET_S = 4.0


@dataclasses.dataclass
class Part:
    line_id: str
    captured_at: float
    is_defect: bool
    missed: bool = False
    frame_id: str = dataclasses.field(default_factory=lambda: f"cam-{uuid.uuid4().hex[:12]}")

    def result(self) -> InspectionResult:
        flagged = self.is_defect and not self.missed
        return InspectionResult(
            frame_id=self.frame_id, line_id=self.line_id, camera_id="cam-1", captured_at=self.captured_at,
            inspected_at=self.captured_at + 0.2, image_score=3.0 if flagged else 1.0, threshold=2.0,
            is_defect=flagged, mode="rgb", model_version="test", maps_bucket="maps",
            anomaly_map_png_key=f"{self.frame_id}.png", anomaly_map_raw_key=f"{self.frame_id}.npy",
            detector_ms=50.0, latency_ms=80.0,
        )

    def label(self) -> Label:
        return Label(frame_id=self.frame_id, line_id=self.line_id, is_defect=self.is_defect,
                     labelled_at=self.captured_at + 30, defect_type="cut" if self.is_defect else None)


class Line:
    """Parts of one line, captured one second apart."""

    def __init__(self, line_id: str, start: float) -> None:
        self.line_id = line_id
        self.clock = start
        self.parts: list[Part] = []

    def add(self, is_defect: bool, missed: bool = False) -> Part:
        self.clock += 1.0
        part = Part(self.line_id, self.clock, is_defect, missed)
        self.parts.append(part)
        return part

    def window(self, end: float) -> tuple[int, int, int, int]:
        """Hand-count (recent defects, recent misses, baseline defects, baseline misses) of defects captured up to ``end``."""
        defects = [p for p in self.parts if p.is_defect and p.captured_at <= end][::-1]
        recent, baseline = defects[:RECENT], defects[RECENT:]
        return len(recent), sum(p.missed for p in recent), len(baseline), sum(p.missed for p in baseline)


def send(settings: Settings, parts: list[Part]) -> None:
    """Publish each part's result, as the worker would, and its label, as an audit station would."""
    producer = new_kafka_producer(settings, client_id="alerts-test-results")
    try:
        for part in parts:
            producer.send(settings.topic_results, key=part.line_id.encode(), value=part.result().dumps())
        producer.flush(timeout=30)
    finally:
        producer.close()
    with LabelPublisher(settings) as publisher:
        for part in parts:
            publisher.send(part.label())


def wait_for_labelled_defects(settings: Settings, line_id: str, total: int, worker) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"worker exited with {worker.returncode}\n{worker.log_tail()}"
        counts = {c.line_id: c for c in line_defect_counts(settings.data_dir, RECENT, 1000)}
        if line_id in counts and counts[line_id].recent_defects + counts[line_id].baseline_defects >= total:
            return
        time.sleep(0.5)
    pytest.fail(f"the sink did not write {total} labelled defects of line {line_id} in time\n{worker.log_tail()}")


def read_alerts(consumer: KafkaConsumer, worker, until_count: int, alerts: list[Alert]) -> list[Alert]:
    """Read alerts until there are ``until_count``, then ``QUIET_S`` more seconds; return all read so far."""
    deadline = time.monotonic() + DEADLINE_S
    quiet_until = time.monotonic() + QUIET_S if len(alerts) >= until_count else None
    while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
        assert worker.poll() is None, f"worker exited with {worker.returncode}\n{worker.log_tail()}"
        for records in consumer.poll(timeout_ms=500).values():
            alerts.extend(Alert.loads(record.value) for record in records)
        if len(alerts) >= until_count and quiet_until is None:
            quiet_until = time.monotonic() + QUIET_S  # a repeated alert would show up here
    return alerts


def fisher(recent_defects: int, recent_misses: int, baseline_defects: int, baseline_misses: int) -> float:
    table = [[recent_misses, recent_defects - recent_misses], [baseline_misses, baseline_defects - baseline_misses]]
    return stats.fisher_exact(table, alternative="greater").pvalue


def test_drift_alert_fires_once_and_clears(
    pipeline_settings, fitted_model_dir: Path, start_worker, webhook_receiver, monkeypatch, capsys
):
    receiver = webhook_receiver()
    settings = dataclasses.replace(
        pipeline_settings(fitted_model_dir),
        alert_check_seconds=1.0, alert_recent_defects=RECENT, alert_baseline_defects=100,
        alert_min_baseline_defects=20, alert_webhook_url=receiver.url,
    )
    ensure_topics(settings)
    worker = start_worker(settings)
    consumer = KafkaConsumer(
        settings.topic_alerts, bootstrap_servers=settings.kafka_bootstrap.split(","), group_id=None,
        auto_offset_reset="earliest",
    )
    busy, quiet = Line("L1", time.time() - 3600), Line("L2", time.time() - 3600)
    alerts: list[Alert] = []

    try:
        # Phase 1, calm: L1 misses 1 of 30 defects among 20 good parts. Quiet L2 misses all of its 4 defects,
        # but a test needs 10 labelled defects.
        calm = [busy.add(True, missed=(i == 7)) for i in range(30)] + [busy.add(False) for _ in range(20)]
        calm += [quiet.add(True, missed=True) for _ in range(4)]
        send(settings, calm)
        wait_for_labelled_defects(settings, "L1", 30, worker)
        wait_for_labelled_defects(settings, "L2", 4, worker)
        assert read_alerts(consumer, worker, 0, alerts) == [], "an alert fired on calm data"

        # Phase 2, drift on L1: 4 defects caught, then 6 missed.
        drift_sent_at = time.time()
        drift = [busy.add(True, missed=(i >= 4)) for i in range(10)]
        send(settings, drift)
        read_alerts(consumer, worker, 1, alerts)

        [fired] = alerts
        assert (fired.state, fired.line_id, fired.condition) == ("firing", "L1", "fnr-drift")
        assert fired.raised_at >= drift_sent_at
        # It fired on drifted frames: its window ends at one of them, and its counts are the hand counts up to there.
        assert fired.window_end in {p.captured_at for p in drift}
        expected = busy.window(fired.window_end)
        assert (fired.recent_defects, fired.recent_misses, fired.baseline_defects, fired.baseline_misses) == expected
        assert fired.p_value == pytest.approx(fisher(*expected))
        assert fired.p_value < settings.alert_p_value
        # With the whole drift in view it is 6 of 10 missed against 1 of 30.
        assert busy.window(drift[-1].captured_at) == (10, 6, 30, 1)

        # Phase 3, recovery: 10 defects caught; the same alert clears, judged against the frozen baseline.
        send(settings, [busy.add(True) for _ in range(10)])
        read_alerts(consumer, worker, 2, alerts)
    finally:
        consumer.close()

    assert [a.state for a in alerts] == ["firing", "cleared"]
    cleared = alerts[1]
    assert cleared.alert_id == fired.alert_id
    assert cleared.line_id == "L1"
    assert (cleared.baseline_defects, cleared.baseline_misses) == (fired.baseline_defects, fired.baseline_misses)
    assert cleared.p_value > settings.alert_clear_p_value

    # The webhook got each alert once, with its text line.
    assert [(b["state"], b["alert_id"]) for b in receiver.bodies] == [("firing", fired.alert_id), ("cleared", fired.alert_id)]
    assert receiver.bodies[0]["text"].startswith("[qcstream firing] line L1: the detector missed")

    # The log has the alert and no trace of the webhook's token.
    log = worker.log_tail(lines=400)
    assert f"FNR drift alert {fired.alert_id}: line L1" in log
    assert "secret-token" not in log
    assert "hunter2" not in log

    # The alerts are in the Parquet data for the dashboard and DuckDB queries.
    with connect(settings.data_dir) as connection:
        rows = connection.execute("SELECT alert_id, state FROM alerts ORDER BY raised_at").fetchall()
    assert rows == [(fired.alert_id, "firing"), (fired.alert_id, "cleared")]

    # A user reads them with `qcstream subscribe alerts`.
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert cli_main(["subscribe", "alerts", "--from-beginning", "--max-messages", "2", "--timeout", "30"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["kind"], p["state"], p["alert_id"]) for p in printed] == [
        ("alert", "firing", fired.alert_id), ("alert", "cleared", fired.alert_id)
    ]
