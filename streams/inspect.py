"""The inspect agent: frame reference in, anomaly maps and an inspection result out.

:class:`FrameInspector` does the per-frame work without Faust, so unit tests call it
directly. :func:`register_inspect_agent` connects it to the topics. The blocking
steps (object store, decoding, the detector) run in a worker thread, so the event
loop keeps sending Kafka heartbeats while a frame is scored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import faust
import numpy as np

from qcstream.models.overlay import render_overlay
from qcstream.settings import Settings
from qcstream.storage.objects import ObjectNotFoundError, ObjectStore, anomaly_map_keys
from qcstream.streams.dead_letters import dead_letter, text_of
from qcstream.streams.payload import PayloadError, decode_frame, decode_point_cloud
from qcstream.streams.records import DeadLetter, FrameRef, InspectionResult, RecordError

logger = logging.getLogger(__name__)


class Detector(Protocol):
    """Interface of :mod:`qcstream.models.detector`'s detector that the worker uses."""

    version: str
    score_range: tuple[float, float]

    def predict(self, rgb: np.ndarray, xyz: np.ndarray | None = None) -> Any: ...


class ModelNotFoundError(FileNotFoundError):
    """The model directory contains no fitted model."""


def load_model(model_dir: Path) -> Detector:
    """Load the fitted detector from ``model_dir`` with a clear error when there is none."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise ModelNotFoundError(f"no fitted model in {model_dir}: run `qcstream fit <folder>` first")

    # Imported here: it pulls in torch, which only the worker needs.
    from qcstream.models.detector import load_detector

    try:
        return load_detector(model_dir)
    except FileNotFoundError as error:
        raise ModelNotFoundError(
            f"no fitted model in {model_dir} ({error}): run `qcstream fit <folder>` first"
        ) from error


class FrameRejected(Exception):
    """A frame that cannot be inspected for a known reason; it goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Outcome of one message: a result, or a dead letter."""

    result: InspectionResult | None = None
    dead_letter: DeadLetter | None = None


def encode_raw_map(anomaly_map: np.ndarray) -> bytes:
    """Return a compressed ``.npz`` holding the float32 map as ``anomaly_map``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, anomaly_map=np.asarray(anomaly_map, dtype=np.float32))
    return buffer.getvalue()


def overlay_caption(frame: FrameRef | InspectionResult, score: float, threshold: float, is_defect: bool) -> str:
    """Return the caption printed under a frame's overlay: verdict, score, line, camera, frame, time.

    For example ``DEFECT  score 27.3 >= threshold 21.9 | line-1 cam-a | frame f-7 | 2026-12-04 21:16:02 UTC``.
    """
    verdict = "DEFECT" if is_defect else "GOOD"
    relation = ">=" if score >= threshold else "<"
    captured = datetime.fromtimestamp(frame.captured_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"{verdict}  score {score:.4g} {relation} threshold {threshold:.4g} | "
        f"{frame.line_id} {frame.camera_id} | frame {frame.frame_id} | {captured}"
    )


class FrameInspector:
    """Scores frames with a detector and stores their anomaly maps."""

    def __init__(self, settings: Settings, detector: Detector, store: ObjectStore) -> None:
        self.settings = settings
        self.detector = detector
        self.store = store
        # One thread, so the detector scores one frame at a time, as in a single agent.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qcstream-inspect")

    async def handle(self, key: bytes | None, value: bytes | None) -> Outcome:
        """Inspect one ``frames`` message and return its outcome.

        Every ``Exception`` becomes a dead letter, so only cancellation propagates.
        """
        topic = self.settings.topic_frames
        try:
            ref = FrameRef.loads(value if value is not None else b"")
        except RecordError as error:
            logger.warning("dead-lettering an invalid frame reference (key %r): %s", text_of(key), error)
            return Outcome(dead_letter=dead_letter(topic, f"invalid frame reference: {error}", key, value))
        except Exception as error:  # e.g. JSON nested too deep to parse
            logger.exception("failed to parse a frame reference (key %r)", text_of(key))
            reason = f"invalid frame reference: {type(error).__name__}: {error}"
            return Outcome(dead_letter=dead_letter(topic, reason, key, value))

        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self.inspect, ref)
        except FrameRejected as error:
            logger.warning(
                "dead-lettering frame %s of line %s camera %s: %s",
                ref.frame_id, ref.line_id, ref.camera_id, error.reason,
            )
            return Outcome(dead_letter=dead_letter(topic, error.reason, key, value))
        except Exception as error:  # one bad frame must not stop the worker
            # NOTE: a MinIO outage that outlasts the object store's retries also ends here.
            # Frames of such an outage are dead-lettered, not retried: replay them afterwards.
            logger.exception(
                "failed to inspect frame %s of line %s camera %s", ref.frame_id, ref.line_id, ref.camera_id
            )
            reason = f"unexpected error: {type(error).__name__}: {error}"
            return Outcome(dead_letter=dead_letter(topic, reason, key, value))

        logger.info(
            "frame %s line %s camera %s: score %.4f threshold %.4f %s, detector %.1f ms, model %s, overlay s3://%s/%s",
            ref.frame_id, ref.line_id, ref.camera_id, result.image_score, result.threshold,
            "DEFECT" if result.is_defect else "GOOD", result.detector_ms, result.model_version,
            result.maps_bucket, result.anomaly_map_png_key,
        )
        return Outcome(result=result)

    def _fetch(self, bucket: str, key: str) -> bytes:
        try:
            return self.store.get_bytes(bucket, key)
        except ObjectNotFoundError as error:
            raise FrameRejected(f"payload not found: {bucket}/{key}") from error
        except ValueError as error:  # an unsafe key in the message
            raise FrameRejected(f"invalid payload key {key!r}: {error}") from error

    def load_inputs(self, ref: FrameRef) -> tuple[np.ndarray, np.ndarray | None]:
        """Fetch and decode the frame's image and, if it has one, its point cloud."""
        if ref.payload_bucket != self.settings.bucket_frames:
            raise FrameRejected(
                f"payload bucket {ref.payload_bucket!r} is not the frames bucket {self.settings.bucket_frames!r}"
            )
        payload = self._fetch(ref.payload_bucket, ref.payload_key)
        try:
            rgb = decode_frame(ref, payload)
        except PayloadError as error:
            raise FrameRejected(f"invalid payload {ref.payload_bucket}/{ref.payload_key}: {error.reason}") from error

        if ref.point_cloud_key is None:
            return rgb, None
        cloud = self._fetch(ref.payload_bucket, ref.point_cloud_key)
        try:
            xyz = decode_point_cloud(cloud, ref.width, ref.height)
        except PayloadError as error:
            raise FrameRejected(
                f"invalid point cloud {ref.payload_bucket}/{ref.point_cloud_key}: {error.reason}"
            ) from error
        return rgb, xyz

    def inspect(self, ref: FrameRef) -> InspectionResult:
        """Score one frame, store its maps and return the result (blocking)."""
        rgb, xyz = self.load_inputs(ref)

        started = time.perf_counter()
        prediction = self.detector.predict(rgb) if xyz is None else self.detector.predict(rgb, xyz)
        detector_ms = (time.perf_counter() - started) * 1000.0
        score, threshold = float(prediction.image_score), float(prediction.threshold)
        if not (math.isfinite(score) and math.isfinite(threshold)):
            raise FrameRejected(f"detector returned a non-finite score {score!r} or threshold {threshold!r}")

        vmin, vmax = self.detector.score_range
        png_key, raw_key = anomaly_map_keys(ref.line_id, ref.captured_at, ref.frame_id)
        bucket = self.settings.bucket_maps
        is_defect = bool(prediction.is_defect)
        overlay = render_overlay(
            rgb, prediction.anomaly_map, vmin, vmax,
            threshold=threshold, caption=overlay_caption(ref, score, threshold, is_defect),
        )
        self.store.put_bytes(bucket, png_key, overlay, "image/png")
        self.store.put_bytes(bucket, raw_key, encode_raw_map(prediction.anomaly_map))

        inspected_at = time.time()
        return InspectionResult(
            frame_id=ref.frame_id,
            line_id=ref.line_id,
            camera_id=ref.camera_id,
            captured_at=ref.captured_at,
            inspected_at=inspected_at,
            image_score=score,
            threshold=threshold,
            is_defect=is_defect,
            mode=str(prediction.mode),
            model_version=str(self.detector.version),
            maps_bucket=bucket,
            anomaly_map_png_key=png_key,
            anomaly_map_raw_key=raw_key,
            detector_ms=detector_ms,
            latency_ms=(inspected_at - ref.captured_at) * 1000.0,
        )


def _pruned(layout: dict | None) -> str:
    return f" pruned to {layout['flops']:.2f} FLOPs" if layout else ""


def register_inspect_agent(app: faust.App, topics: Any, inspector: FrameInspector) -> None:
    """Add the ``inspect`` agent, reading ``topics.frames``, to ``app``."""

    async def inspect(stream: faust.StreamT) -> None:
        detector = inspector.detector
        forms = [getattr(detector, "backbone_form", "torch-fp32") + _pruned(getattr(detector, "pruning", None))]
        if getattr(detector, "reads_point_clouds", False) and detector.config.uses_points:
            forms.append(f"point encoder {detector.point_encoder_form}" + _pruned(detector.point_pruning))
        logger.info("inspect agent started with model version %s (backbone %s)", detector.version, ", ".join(forms))
        async for event in stream.events():
            outcome = await inspector.handle(event.key, event.value)
            try:
                if outcome.result is not None:
                    await topics.publish_result(outcome.result)
                else:
                    await topics.publish_dead_letter(outcome.dead_letter)
            except Exception:  # a failed send must not stop the agent either
                record = outcome.result or outcome.dead_letter
                logger.exception(
                    "failed to publish the outcome of frame %s (line %s) from partition %s offset %s",
                    record.frame_id, record.line_id, event.message.partition, event.message.offset,
                )

    app.agent(topics.frames, name="inspect")(inspect)
