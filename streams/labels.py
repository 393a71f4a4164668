"""Ground-truth labels from the audit station, published to the ``labels`` topic.

Labels are keyed by line id, like frames and results, so the rolling error rates of a
line see its labels in order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qcstream.settings import Settings
from qcstream.streams.producer import ProducerError, new_kafka_producer
from qcstream.streams.records import Label

logger = logging.getLogger(__name__)


def label_from_mask(
    frame_id: str,
    line_id: str,
    mask_path: Path,
    defect_type: str | None = None,
    inspector: str | None = None,
    labelled_at: float | None = None,
) -> Label:
    """Return the label of a frame from its defect mask: defective if any pixel is nonzero."""
    mask_path = Path(mask_path)
    try:
        with Image.open(mask_path) as image:
            mask = np.asarray(image)
    except FileNotFoundError as error:
        raise ValueError(f"mask file {mask_path} does not exist") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"failed to read mask {mask_path}: {error}. Pass a PNG or TIFF mask") from error

    is_defect = bool(np.any(mask != 0))
    return Label(
        frame_id=frame_id,
        line_id=line_id,
        is_defect=is_defect,
        labelled_at=time.time() if labelled_at is None else float(labelled_at),
        defect_type=defect_type if is_defect else None,
        inspector=inspector,
    )


class LabelPublisher:
    """Publishes :class:`Label` records; a context manager, or call :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._kafka = new_kafka_producer(settings, client_id="qcstream-label-publisher")
        self._pending: list[tuple[Label, object]] = []

    def send(self, label: Label) -> None:
        """Queue ``label`` on the ``labels`` topic; :meth:`flush` waits for delivery."""
        if not isinstance(label, Label):
            raise TypeError(f"invalid label of type {type(label).__name__}: expected a Label record")
        future = self._kafka.send(self.settings.topic_labels, key=label.line_id.encode(), value=label.dumps())
        self._pending.append((label, future))
        logger.debug("queued label of frame %s line %s: defect=%s", label.frame_id, label.line_id, label.is_defect)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued label is delivered; raise :class:`ProducerError` if any failed."""
        self._kafka.flush(timeout=timeout)
        failed = [(label, future.exception) for label, future in self._pending if future.failed()]
        self._pending = [(label, future) for label, future in self._pending if not future.is_done]
        for label, error in failed:
            logger.error("label of frame %s line %s was not delivered: %s", label.frame_id, label.line_id, error)
        if failed:
            raise ProducerError(
                f"Kafka did not accept {len(failed)} label(s), first frame {failed[0][0].frame_id}: "
                f"{failed[0][1]}. Check that Kafka is up at {self.settings.kafka_bootstrap}"
            )

    def close(self) -> None:
        """Flush and close the Kafka connection."""
        try:
            self.flush()
        finally:
            self._kafka.close()

    def __enter__(self) -> "LabelPublisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
