"""The end-to-end demo: fit, evaluate, stream the tire test frames, report.

Steps:

1. Start the local Kafka and MinIO.
2. Fit the detector on ``train/good``, once. Later runs reuse the model.
3. Evaluate it on the test split.
4. Start the Faust worker as a child process.
5. Replay the test frames from four camera stations on two lines, and send an
   inspector label per frame from its ground-truth mask.
6. Wait until every frame has a result in the Parquet data.
7. Print the DuckDB quality report, then stop the worker and the services by
   process id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from qcstream.settings import Settings

logger = logging.getLogger(__name__)

#: (line, camera) of the simulated stations; frames are dealt round-robin.
STATIONS = (("line-1", "cam-a"), ("line-1", "cam-b"), ("line-2", "cam-c"), ("line-2", "cam-d"))


@dataclasses.dataclass
class DemoOptions:
    data_root: Path
    refit: bool = False
    keep_services: bool = False
    timeout_seconds: float = 900.0


def run_demo(settings: Settings, options: DemoOptions) -> int:
    """Run the demo; return the process exit code."""
    from qcstream import services

    data_root = options.data_root
    if not data_root.is_dir():
        raise FileNotFoundError(f"data set {data_root} not found: pass --data with an MVTec AD or MVTec 3D-AD category folder")

    print(f"== Starting local Kafka and MinIO (cache: {settings.home})", flush=True)
    settings = services.up(settings)
    worker = None
    try:
        _fit_if_needed(settings, data_root, options.refit)
        _evaluate(settings, data_root)
        _prepare_streams(settings)
        worker = _start_worker(settings)
        streaming_started = time.time()
        frame_ids = _stream_test_frames(settings, data_root)
        _wait_for_results(settings, frame_ids, worker, options.timeout_seconds)
        _print_report(settings, streaming_started)
    finally:
        if worker is not None:
            _stop_worker(worker)
        if not options.keep_services:
            print("== Stopping local Kafka and MinIO (pass --keep-services to browse the maps afterwards)", flush=True)
            services.down(settings)
    return 0


def _fit_if_needed(settings: Settings, data_root: Path, refit: bool) -> None:
    from qcstream.models import data as data_io
    from qcstream.models.detector import CONFIG_FILE, PatchCoreDetector

    if (settings.model_dir / CONFIG_FILE).is_file() and not refit:
        print(f"== Reusing the model in {settings.model_dir} (pass --refit to fit again)", flush=True)
        return
    train = [s.image_path for s in data_io.discover(data_root, "train")]
    validation_folder = data_root / "validation"
    validation = [s.image_path for s in data_io.discover(data_root, "validation")] if validation_folder.is_dir() else []
    print(f"== Fitting the detector on {len(train)} normal images from {data_root}/train", flush=True)
    detector = PatchCoreDetector().fit(train, validation)
    detector.save(settings.model_dir)


def _evaluate(settings: Settings, data_root: Path) -> None:
    from qcstream.models.detector import load_detector
    from qcstream.models.evaluate import evaluate

    print(f"== Evaluating the detector on {data_root}/test", flush=True)
    result = evaluate(load_detector(settings.model_dir), data_root)
    print(result.format(), flush=True)


def _prepare_streams(settings: Settings) -> None:
    """Create the topics and buckets before anything produces, so no client races their creation."""
    from qcstream.storage.objects import ObjectStore
    from qcstream.streams.topics import ensure_topics

    ensure_topics(settings)
    ObjectStore(settings).ensure_buckets(settings.bucket_frames, settings.bucket_maps)


def _start_worker(settings: Settings) -> subprocess.Popen:
    log_path = settings.data_dir / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"== Starting the Faust worker (log: {log_path})", flush=True)
    log_file = open(log_path, "ab")
    env = dict(os.environ, **settings.to_env())
    command = [sys.executable, "-m", "qcstream.cli", "worker"]
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def _stream_test_frames(settings: Settings, data_root: Path) -> set[str]:
    from qcstream.models import data as data_io
    from qcstream.streams.labels import LabelPublisher, label_from_mask
    from qcstream.streams.producer import FrameProducer

    samples = data_io.discover(data_root, "test")
    run_id = uuid.uuid4().hex[:6]
    print(f"== Replaying {len(samples)} test frames from {len(STATIONS)} camera stations on 2 lines (run {run_id})", flush=True)

    frame_ids: set[str] = set()
    with FrameProducer(settings) as producer, LabelPublisher(settings) as labels:
        for index, sample in enumerate(samples):
            line_id, camera_id = STATIONS[index % len(STATIONS)]
            frame_id = f"{run_id}-{sample.defect_type}-{sample.image_path.stem}"
            producer.send_frame(sample.image_path, line_id=line_id, camera_id=camera_id, frame_id=frame_id)
            frame_ids.add(frame_id)
            if sample.mask_path is not None:
                label = label_from_mask(frame_id, line_id, sample.mask_path, defect_type=sample.defect_type, inspector="audit-station")
            else:
                label = _label_without_mask(frame_id, line_id, sample)
            labels.send(label)
        producer.flush()
        labels.flush()
    print(f"== Sent {len(frame_ids)} frames and {len(frame_ids)} inspector labels", flush=True)
    return frame_ids


def _label_without_mask(frame_id: str, line_id: str, sample) -> "Label":
    from qcstream.streams.records import Label

    return Label(frame_id=frame_id, line_id=line_id, is_defect=bool(sample.label), labelled_at=time.time(), defect_type=None if not sample.label else sample.defect_type, inspector="audit-station")


def _wait_for_results(settings: Settings, frame_ids: set[str], worker: subprocess.Popen, timeout_seconds: float) -> None:
    import duckdb

    from qcstream.storage.queries import connect

    deadline = time.monotonic() + timeout_seconds
    seen = 0
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}; see {settings.data_dir / 'worker.log'}")
        try:
            with connect(settings.data_dir) as connection:
                rows = connection.execute("SELECT frame_id FROM results").fetchall()
        except duckdb.Error as error:
            logger.debug("results not readable yet: %s", error)
            rows = []
        done = frame_ids & {row[0] for row in rows}
        if len(done) != seen:
            seen = len(done)
            print(f"   {seen}/{len(frame_ids)} frames inspected", flush=True)
        if seen == len(frame_ids):
            return
        time.sleep(2.0)
    raise TimeoutError(f"only {seen} of {len(frame_ids)} frames had results after {timeout_seconds:.0f} s; see {settings.data_dir / 'worker.log'}")


def _print_report(settings: Settings, streaming_started: float) -> None:
    """Print the report over a window that starts when this run began streaming."""
    from qcstream.storage.report import format_report, quality_report

    time.sleep(settings.sink_batch_seconds + 1.0)  # Let the sink write the last labels.
    window_seconds = time.time() - streaming_started + 1.0
    print("== Quality report (DuckDB over the Parquet results and labels of this run)", flush=True)
    print(format_report(quality_report(settings.data_dir, settings, window_seconds=window_seconds)), flush=True)
    print(f"   Later: `qcstream report --window SECONDS` or `--last N` over everything in {settings.data_dir}", flush=True)
    print("   Live view: run the demo with --keep-services, then `qcstream dashboard` (http://127.0.0.1:8050/)", flush=True)


def _stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is not None:
        return
    print(f"== Stopping the worker (pid {worker.pid})", flush=True)
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        logger.warning("worker pid %d did not stop within 30 s; killing it", worker.pid)
        worker.kill()
        worker.wait()
