"""The camera-station producer: frames to the object store, references to Kafka.

Claim check: a frame with its point cloud can exceed Kafka's 1 MB default message
size. So the payload goes to the ``frames`` bucket, and a small :class:`FrameRef`
JSON goes to the ``frames`` topic. References are keyed by line id, so one line's
frames stay in order.

This module must stay importable without torch, Faust, pyarrow or DuckDB: camera
stations install only numpy, Pillow, kafka-python and minio.
"""

from __future__ import annotations

import io
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from kafka import KafkaProducer
from PIL import Image, UnidentifiedImageError

from qcstream.settings import Settings
from qcstream.models.data import load_xyz
from qcstream.storage.objects import ObjectStore, frame_payload_key, point_cloud_key
from qcstream.streams.payload import PayloadError, decode_point_cloud
from qcstream.streams.records import FrameRef, validate_id

logger = logging.getLogger(__name__)

#: Image input of :meth:`FrameProducer.send_frame`: a file path, PNG/JPEG bytes or an array.
ImageInput = Union[str, Path, bytes, np.ndarray]

#: Image modes sent unchanged. Other PNG modes (16-bit, float) are rejected.
_SENDABLE_MODES = {"RGB", "L"}
#: Image modes converted to RGB before sending.
_CONVERTIBLE_MODES = {"RGBA", "LA", "P", "PA", "1", "CMYK", "YCbCr"}


#: Delivered references are forgotten once this many are waiting for a flush.
_PRUNE_PENDING_AT = 1000


class ProducerError(RuntimeError):
    """Kafka did not accept one or more frame references."""


def new_kafka_producer(settings: Settings, client_id: str) -> KafkaProducer:
    """Return a Kafka producer that waits for all in-sync replicas (``acks="all"``)."""
    return KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap.split(","),
        client_id=client_id,
        acks="all",
        linger_ms=5,
        retries=5,
    )


def new_frame_id(camera_id: str) -> str:
    """Return a fresh frame id: the camera id and 12 random hex digits."""
    return f"{camera_id}-{uuid.uuid4().hex[:12]}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_file_bytes(data: bytes, source: str) -> tuple[bytes, int, int]:
    """Return PNG bytes, width and height of a PNG or JPEG file's contents."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"failed to decode image {source}: {error}. Send a PNG or JPEG file") from error

    if image.format not in {"PNG", "JPEG"}:
        raise ValueError(f"unsupported image format {image.format!r} in {source}: send a PNG or JPEG file")
    if image.format == "PNG" and image.mode in _SENDABLE_MODES:
        return data, image.width, image.height

    # JPEG, or PNG with a palette or alpha: re-encode the decoded pixels as PNG.
    if image.mode not in _SENDABLE_MODES:
        if image.mode not in _CONVERTIBLE_MODES:
            raise ValueError(
                f"unsupported image mode {image.mode!r} in {source}: send 8-bit RGB or grayscale"
            )
        image = image.convert("RGB")
    return _png_bytes(image), image.width, image.height


def encode_image(image: ImageInput) -> tuple[bytes, int, int]:
    """Return ``(png_bytes, width, height)`` for a path, PNG/JPEG bytes or a uint8 array."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file {path} does not exist")
        return _encode_file_bytes(path.read_bytes(), str(path))

    if isinstance(image, (bytes, bytearray, memoryview)):
        return _encode_file_bytes(bytes(image), "bytes")

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(
                f"invalid image array: shape {image.shape} dtype {image.dtype}; "
                "expected (H, W, 3) RGB or (H, W) grayscale uint8"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"invalid image array: empty shape {image.shape}")
        pil_image = Image.fromarray(np.ascontiguousarray(image))
        return _png_bytes(pil_image), pil_image.width, pil_image.height

    raise TypeError(f"invalid image of type {type(image).__name__}: pass a path, PNG/JPEG bytes or a numpy array")


def encode_point_cloud(point_cloud: np.ndarray, width: int, height: int) -> bytes:
    """Return a compressed ``.npz`` (array ``xyz``) of an ``(H, W, 3)`` float point cloud."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, xyz=np.asarray(point_cloud))
    data = buffer.getvalue()
    try:
        decode_point_cloud(data, width, height)
    except PayloadError as error:
        raise ValueError(f"invalid point cloud: {error.reason}") from error
    return data


class FrameProducer:
    """Sends camera frames: payload to the object store, :class:`FrameRef` to Kafka.

    Use it as a context manager, or call :meth:`close`. Kafka delivery is
    asynchronous; :meth:`flush` waits for it and raises :class:`ProducerError` if
    any reference was not delivered.
    """

    def __init__(
        self,
        settings: Settings,
        ensure_buckets: bool = True,
        *,
        store: ObjectStore | None = None,
        kafka_producer: KafkaProducer | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or ObjectStore(settings)
        if ensure_buckets:
            self.store.ensure_buckets(settings.bucket_frames)
        self._kafka = kafka_producer or new_kafka_producer(settings, client_id="qcstream-frame-producer")
        self._pending: list[tuple[FrameRef, object]] = []
        logger.info(
            "frame producer started: topic %s, bucket %s, Kafka %s",
            settings.topic_frames,
            settings.bucket_frames,
            settings.kafka_bootstrap,
        )

    def send_frame(
        self,
        image: ImageInput,
        line_id: str,
        camera_id: str,
        frame_id: str | None = None,
        captured_at: float | None = None,
        point_cloud: np.ndarray | None = None,
    ) -> FrameRef:
        """Upload one frame and queue its reference on the ``frames`` topic.

        Ids are checked before anything is uploaded; a bad id or image raises
        ``ValueError`` and sends nothing.
        """
        validate_id("line_id", line_id)
        validate_id("camera_id", camera_id)
        frame_id = new_frame_id(camera_id) if frame_id is None else validate_id("frame_id", frame_id)
        captured_at = time.time() if captured_at is None else float(captured_at)
        if not math.isfinite(captured_at):
            raise ValueError(f"invalid captured_at {captured_at!r}: expected seconds since the Unix epoch")

        payload, width, height = encode_image(image)
        cloud_bytes = None if point_cloud is None else encode_point_cloud(point_cloud, width, height)

        payload_key = frame_payload_key(line_id, camera_id, captured_at, frame_id, "png")
        cloud_key = None if cloud_bytes is None else point_cloud_key(line_id, camera_id, captured_at, frame_id)
        ref = FrameRef(
            frame_id=frame_id,
            line_id=line_id,
            camera_id=camera_id,
            captured_at=captured_at,
            payload_bucket=self.settings.bucket_frames,
            payload_key=payload_key,
            payload_format="png",
            width=width,
            height=height,
            point_cloud_key=cloud_key,
            sent_at=time.time(),
        )

        # The payload must be in place before its claim check can be read.
        self.store.put_bytes(self.settings.bucket_frames, payload_key, payload, content_type="image/png")
        if cloud_bytes is not None:
            self.store.put_bytes(
                self.settings.bucket_frames, cloud_key, cloud_bytes, content_type="application/octet-stream"
            )

        future = self._kafka.send(self.settings.topic_frames, key=line_id.encode(), value=ref.dumps())
        if len(self._pending) >= _PRUNE_PENDING_AT:
            self._pending = [(r, f) for r, f in self._pending if not f.succeeded()]
        self._pending.append((ref, future))
        logger.debug("queued frame %s of line %s camera %s (%dx%d)", frame_id, line_id, camera_id, width, height)
        return ref

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued reference is delivered; raise if any failed."""
        self._kafka.flush(timeout=timeout)
        failed = []
        for ref, future in self._pending:
            if future.failed():
                failed.append((ref.frame_id, future.exception))
                logger.error(
                    "frame reference %s of line %s camera %s was not delivered: %s",
                    ref.frame_id,
                    ref.line_id,
                    ref.camera_id,
                    future.exception,
                )
        self._pending = [(ref, future) for ref, future in self._pending if not future.is_done]
        if failed:
            names = ", ".join(frame_id for frame_id, _ in failed)
            raise ProducerError(
                f"Kafka did not accept {len(failed)} frame reference(s): {names}; "
                f"first error: {failed[0][1]}. Check that Kafka is up at {self.settings.kafka_bootstrap}"
            )

    def close(self) -> None:
        """Flush and close the Kafka connection."""
        try:
            self.flush()
        finally:
            self._kafka.close()
            logger.info("frame producer closed")

    def __enter__(self) -> "FrameProducer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def replay_folder(
    settings: Settings,
    images: Sequence[Path],
    line_id: str,
    camera_id: str,
    interval_s: float = 0.0,
    point_clouds: Sequence[Path | None] | None = None,
) -> list[FrameRef]:
    """Send ``images`` in order as frames of one camera, ``interval_s`` apart.

    Useful to replay recorded frames into a line as if a camera took them now.
    ``point_clouds``, when given, holds one organized-cloud TIFF path (MVTec 3D-AD
    ``xyz/NNN.tiff``) or None per image; each cloud travels with its frame.
    """
    validate_id("line_id", line_id)
    validate_id("camera_id", camera_id)
    if interval_s < 0:
        raise ValueError(f"invalid interval_s {interval_s!r}: expected a number >= 0")
    if point_clouds is not None and len(point_clouds) != len(images):
        raise ValueError(f"got {len(point_clouds)} point clouds for {len(images)} images: pass one path or None per image")

    refs = []
    with FrameProducer(settings) as producer:
        for index, path in enumerate(images):
            if index and interval_s:
                time.sleep(interval_s)
            cloud_path = point_clouds[index] if point_clouds is not None else None
            cloud = None if cloud_path is None else load_xyz(cloud_path)
            refs.append(producer.send_frame(path, line_id=line_id, camera_id=camera_id, point_cloud=cloud))
    logger.info("replayed %d frames to line %s camera %s", len(refs), line_id, camera_id)
    return refs
