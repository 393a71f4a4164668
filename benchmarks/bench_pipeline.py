"""Measure the detector and the streaming pipeline on the tire data.

    .venv/bin/python benchmarks/bench_pipeline.py [--frames 58] [--output docs/benchmarks.md]

Reports, from one run: detector milliseconds per frame (median and p95 over the test
frames, one frame at a time as the worker scores them), the peak resident memory of
a process that loads the model and scores, and end-to-end frames per second through
producer -> Kafka -> worker -> MinIO and Parquet. Needs the fitted model of
`qcstream fit` (or `make demo`) in $QCSTREAM_MODEL_DIR; starts the local services
itself when they are not running, and stops them again. Appends the results, with the command, machine and date, to the output file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "mvtec3d_tire"


def measure_detector(model_dir: Path, data_root: Path, frames: int) -> dict:
    """Score test frames one at a time in a fresh process; return timings and peak RSS."""
    code = f"""
import json, resource, time, statistics
from qcstream.models import data
from qcstream.models.detector import load_detector
detector = load_detector({str(model_dir)!r})
images = [data.load_rgb(s.image_path) for s in data.discover({str(data_root)!r}, "test")][:{frames}]
detector.predict(images[0])
times = []
for image in images:
    started = time.perf_counter()
    detector.predict(image)
    times.append((time.perf_counter() - started) * 1000)
times.sort()
print(json.dumps({{"frames": len(times), "median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "model_version": detector.version}}))
"""
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_pipeline(data_root: Path, frames: int) -> dict:
    """Stream ``frames`` test frames through a worker and time the first to the last result."""
    from qcstream import services
    from qcstream.models import data as data_io
    from qcstream.settings import Settings
    from qcstream.storage.queries import connect
    from qcstream.streams.producer import FrameProducer

    was_running = all(item.running for item in services.status().values())
    settings = services.up(Settings.from_env())
    started_services = not was_running
    suffix = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        settings,
        data_dir=settings.data_dir / f"bench-{suffix}",
        topic_frames=f"bench-frames-{suffix}", topic_results=f"bench-results-{suffix}",
        topic_defects=f"bench-defects-{suffix}", topic_labels=f"bench-labels-{suffix}",
        topic_dead_letter=f"bench-dead-letter-{suffix}", app_id=f"qcstream-bench-{suffix}",
    )
    env = dict(os.environ, **settings.to_env())
    log_path = settings.data_dir / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen([sys.executable, "-m", "qcstream.cli", "worker"], env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        samples = data_io.discover(data_root, "test")
        paths = [samples[i % len(samples)].image_path for i in range(frames)]
        ids = set()
        time.sleep(15)  # Let the worker join its consumer group before the clock starts.
        started = time.perf_counter()
        with FrameProducer(settings) as producer:
            for i, path in enumerate(paths):
                ref = producer.send_frame(path, line_id=f"line-{i % 2 + 1}", camera_id=f"cam-{i % 4}", frame_id=f"bench-{suffix}-{i}")
                ids.add(ref.frame_id)
            producer.flush()
        done = 0
        while done < len(ids) and time.perf_counter() - started < 1800:
            time.sleep(1.0)
            try:
                with connect(settings.data_dir) as connection:
                    done = connection.execute("SELECT count(DISTINCT frame_id) FROM results").fetchone()[0]
            except Exception:  # noqa: BLE001 - no Parquet file yet
                done = 0
        elapsed = time.perf_counter() - started
        return {"frames": done, "seconds": elapsed, "fps": done / elapsed, "worker_peak_rss_mb": peak_rss_mb(worker.pid)}
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        if started_services:
            services.down(settings)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (``VmHWM``) of a running process, MB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def feature_source(config: dict) -> str:
    """Name the layers a saved model's features come from, for the report line."""
    if config["backbone"] == "efficientnet_lite0":
        return "EfficientNet-Lite0 stages 2 and 4"
    return f"ViT blocks {config['layers']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=58, help="frames to score and to stream (default: 58)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data set root with a test split")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="Markdown file to append to")
    args = parser.parse_args()

    from qcstream.settings import Settings

    model_dir = Settings.from_env().model_dir
    detector = measure_detector(model_dir, args.data, args.frames)
    print("detector:", detector, flush=True)
    pipeline = measure_pipeline(args.data, args.frames)
    print("pipeline:", pipeline, flush=True)

    meta = json.loads((model_dir / "config.json").read_text())
    config = meta["config"]
    form = meta.get("backbone_form", "torch-fp32")
    if meta.get("pruning"):
        form += f", pruned to {meta['pruning']['flops']:.2f} FLOPs"
    command = f"QCSTREAM_MODEL_DIR={model_dir} python benchmarks/bench_pipeline.py " + " ".join(sys.argv[1:])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, Python {platform.python_version()}"
    section = f"""
## Detector and pipeline, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}

Command: `{command.strip()}`. Machine: {machine}. Model: `{detector['model_version']}` (input {config['image_size'][0]}x{config['image_size'][1]}, {feature_source(config)}, backbone {form}).

| measure | value |
|---|---|
| detector, median ms per frame ({detector['frames']} frames, one at a time) | {detector['median_ms']:.0f} |
| detector, p95 ms per frame | {detector['p95_ms']:.0f} |
| peak RSS of a process that loads the model and scores, MB | {detector['peak_rss_mb']:.0f} |
| end-to-end frames per second (producer -> Kafka -> one worker -> MinIO + Parquet, {pipeline['frames']} frames) | {pipeline['fps']:.2f} |
| end-to-end seconds for those frames | {pipeline['seconds']:.1f} |
| peak RSS of the worker process after those frames, MB | {pipeline['worker_peak_rss_mb']:.0f} |
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not args.output.exists():
        args.output.write_text("# Benchmarks\n\nEach section is one run of the command it names; numbers are from that run only.\n")
    with args.output.open("a") as handle:
        handle.write(section)
    print(f"appended to {args.output}")


if __name__ == "__main__":
    main()
